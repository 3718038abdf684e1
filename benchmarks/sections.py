"""
The report's sections, as ``tables`` models: which figures each shows, and the prose that
reads them. ``report`` writes them to the terminal and to RESULTS.rst alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import hotpaths
import network
import request_report
from backends import BASELINE
from stats import geometric_mean
from summary import (
    COMPARED,
    ELASTI_TLS,
    MAIN,
    OURS,
    OURS_PYMEMCACHE,
    OURS_TLS,
    PYMEMCACHE_COMPARED,
)
from tables import Notes, Paragraph, Section, Table, fmt_added, fmt_ratio, fmt_us
from targets import target_table

SHORT = {
    "ours": "ours",
    "ours_pymemcache": "ours pymemcache",
    "ours_pymemcache_tls": "ours pymemcache, TLS",
    "elastipymemcache_tls": "elastipymemcache, TLS",
    BASELINE: "stock",
    "pymemcache": "PyMemcacheCache",
    "elastipymemcache": "elastipymemcache",
    "raw": "raw pylibmc",
}
SCALING_CASES = ("get_many(100) 100 B", "get_many(100) 10 KB")


def operations_rows(summary: Mapping[str, Any], nodes: str, names: Sequence[str]):
    for case, by_name in summary["median_us"][nodes].items():
        yield [case, *(fmt_us(by_name[name]) for name in names)]


def ratio_rows(summary: Mapping[str, Any], nodes: str):
    ours_vs = summary["ours_vs"][nodes]
    for case in ours_vs:
        yield [
            case,
            fmt_us(summary["median_us"][nodes][case][OURS]),
            *(fmt_ratio(ours_vs[case][other]) for other in COMPARED),
        ]


RATIO_HEADER = ["operation", "ours µs", *(f"vs {SHORT[other]}" for other in COMPARED)]


def scaling_rows(summary: Mapping[str, Any], names: Sequence[str]):
    for case in SCALING_CASES:
        for nodes in sorted(summary["median_us"], key=int):
            by_name = summary["median_us"][nodes][case]
            ratio = summary["ours_vs"][nodes][case]["elastipymemcache"]
            yield [
                f"{case}, {nodes} node(s)",
                *(fmt_us(by_name[n]) for n in names),
                fmt_ratio(ratio),
            ]


PYMEMCACHE_HEADER = [
    "operation",
    "ours pymemcache µs",
    "elastipymemcache µs",
    "PyMemcacheCache µs",
    *(f"vs {SHORT[other]}" for other in PYMEMCACHE_COMPARED[:-1]),
    "vs ours (pylibmc)",
]


def pymemcache_rows(summary: Mapping[str, Any]):
    """Every operation on the main cluster, then the get_many(100) of the other sizes."""
    for nodes in sorted(summary["pymemcache_vs"], key=lambda nodes: (nodes != MAIN, int(nodes))):
        us = summary["median_us"][nodes]
        for case, ratios in summary["pymemcache_vs"][nodes].items():
            yield [
                case if nodes == MAIN else f"{case}, {nodes} node(s)",
                fmt_us(us[case][OURS_PYMEMCACHE]),
                fmt_us(us[case]["elastipymemcache"]),
                fmt_us(us[case]["pymemcache"]),
                *(fmt_ratio(ratios[other]) for other in PYMEMCACHE_COMPARED),
            ]


def pymemcache_line(summary: Mapping[str, Any]) -> str:
    overall = summary["pymemcache_overall"]
    return (
        f"Our pymemcache backend was faster than django-elastipymemcache on "
        f"{overall['faster']} of the {overall['operations']} operations measured, "
        f"{overall['geometric_mean']:.2f}x on geometric mean."
    )


TLS_HEADER = [
    "operation",
    "clear µs",
    "TLS µs",
    "TLS / clear",
    "TLS adds µs",
    "elastipymemcache TLS µs",
    "its TLS / clear",
    "ours vs it, TLS",
    "ours vs it, clear",
]


def tls_rows(summary: Mapping[str, Any]):
    for case, data in summary["tls"]["cases"].items():
        us, ours, elasti = data["median_us"], data["cost"][OURS_TLS], data["cost"][ELASTI_TLS]
        yield [
            case,
            fmt_us(us[OURS_PYMEMCACHE]),
            fmt_us(us[OURS_TLS]),
            fmt_ratio(ours["ratio"]),
            fmt_added(ours["added_us"]),
            fmt_us(us[ELASTI_TLS]),
            fmt_ratio(elasti["ratio"]),
            fmt_ratio(data["ours_vs_elastipymemcache"]["tls"]),
            fmt_ratio(data["ours_vs_elastipymemcache"]["clear"]),
        ]


def tls_parity_line(summary: Mapping[str, Any]) -> str:
    """
    Ours against django-elastipymemcache in the TLS rounds, with TLS and without: medians
    over the operations, since one operation 47 times faster would carry a geometric mean.
    """
    cases = summary["tls"]["cases"].values()
    tls = sorted(data["ours_vs_elastipymemcache"]["tls"] for data in cases)
    clear = sorted(data["ours_vs_elastipymemcache"]["clear"] for data in cases)
    return (
        f"Relative to django-elastipymemcache, ours was {statistics.median(tls):.2f}x "
        f"(median over the operations; {tls[0]:.2f}x to {tls[-1]:.2f}x) with TLS, where both "
        f"hash the nodes' hostnames, and {statistics.median(clear):.2f}x ({clear[0]:.2f}x to "
        f"{clear[-1]:.2f}x) in clear text, where django-elastipymemcache hashes their IPs."
    )


def tls_cost_line(summary: Mapping[str, Any]) -> str:
    ratios = [data["cost"][OURS_TLS]["ratio"] for data in summary["tls"]["cases"].values()]
    cheapest, dearest = min(ratios), max(ratios)
    return (
        f"TLS made our pymemcache backend's operations {geometric_mean(ratios):.2f}x "
        f"as slow on geometric mean, from {cheapest:.2f}x to {dearest:.2f}x."
    )


def tls_notes(results: Mapping[str, Any]) -> list[str]:
    """How the TLS contenders were set up."""
    tls_us = {case: data["median_us"] for case, data in results["summary"]["tls"]["cases"].items()}
    return [
        "django-elastipymemcache has no TLS option of its own, but its OPTIONS reach "
        "pymemcache's ``HashClient``, whose ``tls_context`` covers every node and the "
        "configuration endpoint. It connects to the nodes' IPs by default, which their "
        "certificates do not name, so verification fails; with ``use_vpc_ip_address`` False "
        "it connects by hostname, which here a ``socket_module`` resolves as DNS would.",
        "django-elastipymemcache leaves pymemcache's ``no_delay`` at its default, off "
        "(Nagle's algorithm on); ours turns it on. Over TLS its set of 500 KB took "
        f"{fmt_us(tls_us['set 500 KB'][ELASTI_TLS])} µs, ours "
        f"{fmt_us(tls_us['set 500 KB'][OURS_TLS])} µs.",
    ]


def versus_stock_line(summary: Mapping[str, Any]) -> str:
    overall = summary["versus_stock_overall"]
    return (
        f"Ours was faster than stock on {overall['faster']} of the {overall['operations']} "
        f"operations measured, {overall['geometric_mean']:.2f}x on geometric mean."
    )


def machine_line(results: Mapping[str, Any]) -> str:
    machine = results["machine"]
    versions = machine["versions"]
    return (
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), shared with other work "
        f"(load average {results['load_before'][0]} before, {results['load_after'][0]} after); "
        f"Linux {machine['kernel']}; {machine['python_implementation']} {machine['python']}; "
        f"Django {versions['Django']}; pylibmc {versions['pylibmc']} with libmemcached "
        f"{machine['libmemcached']}; pymemcache {versions['pymemcache']}; "
        f"django-elastipymemcache {versions['django-elastipymemcache']}; "
        f"memcached {machine['memcached']}."
    )


def notes(summary: Mapping[str, Any]) -> list[str]:
    """Figures from the tables above that a reader would otherwise have to dig for."""
    us = summary["median_us"][MAIN]
    many = "set_many(100) 100 B"
    return [
        f"{many} takes ours {fmt_us(us[many][OURS])} µs, raw pylibmc "
        f"{fmt_us(us[many]['raw'])} µs and django-elastipymemcache "
        f"{fmt_us(us[many]['elastipymemcache'])} µs: pylibmc's ``set_multi`` waits for each "
        f"key's reply in turn, pymemcache sends each node its keys together.",
    ]


def main_sections(results: Mapping[str, Any]) -> list[Section]:
    """Every section of a full run, in reading order."""
    summary = results["summary"]
    names = list(results["contenders"])
    sections = [
        Section(
            f"Operations, {MAIN}-node cluster",
            [
                Table.of(
                    ["operation", *(SHORT[n] for n in names)],
                    operations_rows(summary, MAIN, names),
                    "Median µs per call.",
                ),
                Table.of(
                    RATIO_HEADER,
                    ratio_rows(summary, MAIN),
                    "Speed of ours relative to each contender (above 1: ours is faster); "
                    "*ours µs* is the median time of one call.",
                ),
                Notes(notes(summary)),
            ],
        ),
        Section(
            "get_many(100) from 1 to 10 nodes",
            [
                Table.of(
                    ["case", *(SHORT[n] for n in names), "ours vs elastipymemcache"],
                    scaling_rows(summary, names),
                    "Median µs per call, and the speed of ours relative to elastipymemcache.",
                )
            ],
        ),
        Section(
            "pymemcache backend",
            [
                Paragraph(
                    "Our pymemcache backend, ``django_elasticache.pymemcache.ElastiCache``, on "
                    "the clusters above and in the same rounds: median µs per call, and its "
                    "speed relative to django-elastipymemcache, Django's ``PyMemcacheCache`` "
                    "and our pylibmc backend."
                ),
                Table.of(PYMEMCACHE_HEADER, pymemcache_rows(summary)),
                Notes([pymemcache_line(summary)]),
            ],
        ),
        tls_section(results),
        *([hotpaths_section(results["hotpaths"])] if "hotpaths" in results else []),
        *([network.section(results["network"])] if "network" in results else []),
        Section(
            "Targets",
            [
                Paragraph(
                    "Each target's worst case, with the quartiles of its per-round ratios: "
                    "when they straddle the bound, the pass or the miss is within the noise "
                    "of a shared machine."
                ),
                target_table(
                    [
                        *summary["targets"],
                        *summary.get("hotpath_targets", []),
                        *summary.get("network_targets", []),
                        *results.get("requests", {}).get("targets", []),
                    ]
                ),
                Notes([versus_stock_line(summary)]),
            ],
        ),
    ]
    if "requests" in results:
        sections += request_report.sections(results["requests"])
    return sections


def hotpaths_section(figures: Mapping[str, Any]) -> Section:
    return Section(
        "Hot paths beside raw clients",
        [
            Paragraph(
                "``benchmarks/hotpaths.py``: each hot path against the raw client calls that "
                f"bound it, on 3-node clusters, {figures['rounds']} interleaved rounds of "
                f"{figures['calls']} calls. Raw pylibmc is given finished keys; single-key "
                "calls cycle over 100 keys, so that every contender meets every node (over "
                "loopback on a small machine a node answers in 20 to 70 µs depending on "
                "the CPU its memcached thread runs on). The last column is the median of "
                "the per-round ratios of the times, above 1 when ours is slower."
            ),
            Table.of(hotpaths.HEADER, hotpaths.rows(figures)),
            Notes([hotpaths.floor_line(figures)]),
        ],
    )


def tls_section(results: Mapping[str, Any]) -> Section:
    summary = results["summary"]
    tls = results["tls"]
    return Section(
        "TLS cost",
        [
            Paragraph(
                f"Our pymemcache backend with ``OPTIONS['TLS']`` on a {tls['nodes']}-node "
                "``LocalCluster(tls=True)`` (nodes and endpoint TLS only, certificates from a "
                "throwaway CA, verified with hostnames), and the same backend on an otherwise "
                "identical clear-text cluster, in the same interleaved rounds "
                f"({tls['rounds']}); django-elastipymemcache likewise. *TLS / clear* is "
                "the median of the per-round ratios of the times, above 1 when TLS is slower; "
                "*TLS adds* the median of the per-round differences; the last two columns are "
                "the speed of ours relative to django-elastipymemcache, with TLS and without."
            ),
            Table.of(TLS_HEADER, tls_rows(summary)),
            Notes([tls_cost_line(summary), tls_parity_line(summary), *tls_notes(results)]),
        ],
    )
