"""
Figures from the samples, and the four forms they are written in: a text table, the JSON
of every sample, a chart and the README section.

A ratio is a speed ratio, the median over rounds of (the other's seconds / ours) for the
same round, so above 1 means ours is faster; pairing by round cancels the drift of a shared
machine that medians taken separately would keep.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tuning
from backends import BASELINE, TLS_PAIRS

OURS = "ours"
COMPARED = (BASELINE, "stock_defaults", "raw", "elastipymemcache", "pymemcache")
"""The contenders ours is compared with, in column order."""

SHORT = {
    "ours": "ours",
    "ours_pymemcache": "ours pymemcache",
    "ours_pymemcache_tls": "ours pymemcache, TLS",
    "elastipymemcache_tls": "elastipymemcache, TLS",
    BASELINE: "stock",
    "stock_defaults": "stock, default behaviours",
    "pymemcache": "PyMemcacheCache",
    "elastipymemcache": "elastipymemcache",
    "raw": "raw pylibmc",
}

MAIN = "3"
LARGEST = "10"
SCALING_CASES = ("get_many(100) 100 B", "get_many(100) 10 KB")

STOCK_TARGET = 0.97
PYMEMCACHE_TARGET = 0.97
"""Parity with django-elastipymemcache, less the few per cent two identical clients differ."""
ELASTI_GET_SET_TARGET = 1.5
ELASTI_GET_MANY_TARGET = 2.0
RAW_TARGET = 1.25

OURS_PYMEMCACHE = "ours_pymemcache"
PYMEMCACHE_COMPARED = ("elastipymemcache", "pymemcache", OURS)
"""What our pymemcache backend is compared with, in column order."""
OURS_TLS = "ours_pymemcache_tls"
ELASTI_TLS = "elastipymemcache_tls"

TINY_BAR = 0.1
"""Bars lower than this get their value written on them, or they would read as zero."""
LEGEND_COLUMNS = 4
"""Legend entries per row under the chart: seven in one row would not fit its width."""

CHART_TITLE = (
    "Speed relative to Django's PyLibMCCache (static node list, our behaviours), "
    "3-node LocalCluster; higher is faster"
)


def paired(seconds: Mapping[str, Sequence[float]], faster: str, slower: str) -> list[float]:
    """How many times faster ``faster`` ran than ``slower``, in each round."""
    return [b / a for a, b in zip(seconds[faster], seconds[slower], strict=True)]


def speed(seconds: Mapping[str, Sequence[float]], faster: str, slower: str) -> float:
    """The median of the per-round ratios."""
    return statistics.median(paired(seconds, faster, slower))


def micros(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e6


def op_of(case: str) -> str:
    return case.split()[0]


# Summary


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Every figure the reports show, computed once, and kept in the JSON with the samples."""
    clusters = results["clusters"]
    return {
        "median_us": {
            nodes: {
                case: {name: micros(values) for name, values in data["seconds"].items()}
                for case, data in cluster["cases"].items()
            }
            for nodes, cluster in clusters.items()
        },
        "ours_vs": {
            nodes: {
                case: {other: speed(data["seconds"], OURS, other) for other in COMPARED}
                for case, data in cluster["cases"].items()
            }
            for nodes, cluster in clusters.items()
        },
        "versus_stock": {
            case: {name: speed(data["seconds"], name, BASELINE) for name in data["seconds"]}
            for case, data in clusters[MAIN]["cases"].items()
        },
        "pymemcache_vs": {
            nodes: {
                case: {
                    other: speed(data["seconds"], OURS_PYMEMCACHE, other)
                    for other in PYMEMCACHE_COMPARED
                }
                for case, data in cluster["cases"].items()
            }
            for nodes, cluster in clusters.items()
        },
        "targets": targets(clusters),
        "versus_stock_overall": versus_stock_overall(clusters),
        "pymemcache_overall": overall(clusters, OURS_PYMEMCACHE, "elastipymemcache"),
        "probes": summarize_probes(results["probes"]["samples"]),
        "tuning": summarize_tuning(results["tuning"]),
        "tls": summarize_tls(results["tls"]),
    }


@dataclass(frozen=True)
class Target:
    """
    One of the issue's targets: the speed of ``faster`` over ``slower`` on the cases
    ``wanted`` picks, at least ``bound`` on the worst case (or at most, ``at_most``).
    """

    text: str
    nodes: tuple[str, ...]
    wanted: Callable[[str], bool]
    faster: str
    slower: str
    bound: float
    at_most: bool = False


def get_or_set(size: str) -> Callable[[str], bool]:
    return lambda case: op_of(case) in ("get", "set") and case.endswith(f" {size}")


SIZE_NAMES = ("100 B", "10 KB", "500 KB")

TARGETS = (
    Target(
        f"ours >= {STOCK_TARGET}x stock PyLibMCCache, every operation and cluster",
        ("1", MAIN, LARGEST),
        lambda case: True,
        OURS,
        BASELINE,
        STOCK_TARGET,
    ),
    *(
        Target(
            f"ours >= {ELASTI_GET_SET_TARGET}x django-elastipymemcache, get and set {size}",
            (MAIN,),
            get_or_set(size),
            OURS,
            "elastipymemcache",
            ELASTI_GET_SET_TARGET,
        )
        for size in SIZE_NAMES
    ),
    Target(
        f"ours pymemcache >= {PYMEMCACHE_TARGET}x django-elastipymemcache, every operation "
        "and cluster",
        ("1", MAIN, LARGEST),
        lambda case: True,
        OURS_PYMEMCACHE,
        "elastipymemcache",
        PYMEMCACHE_TARGET,
    ),
    Target(
        f"ours >= {ELASTI_GET_MANY_TARGET}x django-elastipymemcache, get_many(100) on "
        f"{LARGEST} nodes",
        (LARGEST,),
        lambda case: case.startswith("get_many(100)"),
        OURS,
        "elastipymemcache",
        ELASTI_GET_MANY_TARGET,
    ),
    *(
        Target(
            f"raw pylibmc <= {RAW_TARGET}x faster than ours, get and set {size}",
            (MAIN,),
            get_or_set(size),
            "raw",
            OURS,
            RAW_TARGET,
            at_most=True,
        )
        for size in SIZE_NAMES
    ),
)


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4)
    return first, third


def targets(clusters: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target with its worst case, and the quartiles of that case's per-round ratios:
    a worst case whose quartiles straddle the bound is as likely noise as a miss."""
    summary = []
    for target in TARGETS:
        measured = []
        for nodes in target.nodes:
            for case, data in clusters[nodes]["cases"].items():
                if target.wanted(case):
                    ratios = paired(data["seconds"], target.faster, target.slower)
                    measured.append((statistics.median(ratios), f"{case}, {nodes} nodes", ratios))
        pick = max if target.at_most else min
        worst, where, ratios = pick(measured, key=lambda item: item[0])
        met = worst <= target.bound if target.at_most else worst >= target.bound
        summary.append(
            {
                "target": target.text,
                "where": where,
                "worst": worst,
                "quartiles": quartiles(ratios),
                "met": met,
                "cases": len(measured),
            }
        )
    return summary


def versus_stock_overall(clusters: Mapping[str, Any]) -> dict[str, Any]:
    """On how many operations ours was faster than stock, and by how much on average
    (geometric mean): a worst case of many noisy ratios is lower than the truth."""
    return overall(clusters, OURS, BASELINE)


def overall(clusters: Mapping[str, Any], faster: str, slower: str) -> dict[str, Any]:
    """On how many operations of every cluster ``faster`` was faster, and the geometric mean
    of its speed ratios."""
    ratios = [
        speed(data["seconds"], faster, slower)
        for cluster in clusters.values()
        for data in cluster["cases"].values()
    ]
    return {
        "faster": sum(ratio > 1 for ratio in ratios),
        "operations": len(ratios),
        "geometric_mean": tuning.geometric_mean(ratios),
    }


def summarize_probes(samples: Mapping[str, Mapping[str, list[float]]]) -> dict[str, Any]:
    medians = {
        name: {metric: statistics.median(values) for metric, values in metrics.items()}
        for name, metrics in samples.items()
    }
    for metrics in medians.values():
        metrics["first_request_ms"] = (
            metrics["import_ms"] + metrics["build_ms"] + metrics["first_get_ms"]
        )
        metrics["rss_growth_kib"] = metrics["rss_after_kib"] - metrics["rss_before_kib"]
    return medians


def summarize_tls(data: Mapping[str, Any]) -> dict[str, Any]:
    """
    Per operation, each TLS contender against its clear-text twin: the median of the
    per-round ratios of their times (above 1: TLS is slower) and of the per-round
    differences; and our pymemcache backend against django-elastipymemcache, each side
    with TLS and each without. Then the connections of a fresh process, likewise paired.
    """
    cases = {}
    for case, case_data in data["cases"].items():
        seconds = case_data["seconds"]
        cases[case] = {
            "median_us": {name: micros(values) for name, values in seconds.items()},
            "cost": {
                tls: {
                    "ratio": speed(seconds, clear, tls),
                    "added_us": statistics.median(minus(seconds[tls], seconds[clear])) * 1e6,
                }
                for tls, clear in TLS_PAIRS.items()
            },
            "ours_vs_elastipymemcache": {
                "tls": speed(seconds, OURS_TLS, ELASTI_TLS),
                "clear": speed(seconds, OURS_PYMEMCACHE, "elastipymemcache"),
            },
        }
    samples = {
        name: {**metrics, **connection_costs(metrics)}
        for name, metrics in data["probes"]["samples"].items()
    }
    connections = {
        name: {metric: statistics.median(values) for metric, values in metrics.items()}
        for name, metrics in samples.items()
    }
    first_request = {
        tls: {
            "ratio": speed(
                {name: samples[name]["connections_ms"] for name in (tls, clear)}, clear, tls
            ),
            "added_ms": {
                metric: statistics.median(minus(samples[tls][metric], samples[clear][metric]))
                for metric in (*CONNECTION_STEPS, "connections_ms", "build_ms")
            },
        }
        for tls, clear in TLS_PAIRS.items()
    }
    return {"cases": cases, "connections": connections, "first_request": first_request}


CONNECTION_STEPS = ("discovery_ms", "first_node_ms", "other_nodes_ms")


def connection_costs(metrics: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """
    Per round: the first node's connection (the first get less a warm one), the other
    nodes' (the first get_many less a warm one), and with discovery the three together.
    """
    first_node = minus(metrics["first_get_ms"], metrics["warm_get_ms"])
    other_nodes = minus(metrics["first_get_many_ms"], metrics["warm_get_many_ms"])
    return {
        "first_node_ms": first_node,
        "other_nodes_ms": other_nodes,
        "connections_ms": [
            sum(steps)
            for steps in zip(metrics["discovery_ms"], first_node, other_nodes, strict=True)
        ],
    }


def minus(values: Sequence[float], others: Sequence[float]) -> list[float]:
    """Round by round, each value less the other of the same round."""
    return [value - other for value, other in zip(values, others, strict=True)]


def summarize_tuning(data: Mapping[str, Any]) -> dict[str, Any]:
    """
    Each candidate's ratio per operation and over the operations it can affect, and the
    decision against the bar the control sets. A candidate's ratio is taken against the
    faster of the two instances with the current defaults, reference and control, so that
    one slow measurement of the reference cannot make every candidate look good.
    """
    round_trip = data["round_trip"]
    binary_ok = (
        round_trip[tuning.OURS_BINARY]["identical"] >= round_trip[tuning.OURS_TEXT]["identical"]
    )
    control = next(candidate for candidate in tuning.CANDIDATES if candidate.control)

    def versus_defaults(seconds: Mapping[str, Sequence[float]], name: str) -> float:
        reference = speed(seconds, name, tuning.REFERENCE)
        return (
            reference
            if name == control.name
            else min(reference, speed(seconds, name, control.name))
        )

    per_case = {
        candidate.name: {
            case: versus_defaults(case_data["seconds"], candidate.name)
            for case, case_data in data["cases"].items()
        }
        for candidate in tuning.CANDIDATES[1:]
    }
    needed = tuning.bar(per_case[control.name])
    summary = {}
    for candidate in tuning.CANDIDATES[1:]:
        ratios = per_case[candidate.name]
        relevant = {case: ratio for case, ratio in ratios.items() if candidate.affects(case)}
        round_trip_ok = binary_ok or candidate.name != tuning.BINARY
        summary[candidate.name] = {
            "per_case": ratios,
            "geometric_mean": tuning.geometric_mean(list(relevant.values())),
            "decision": tuning.decide(
                candidate, relevant, needed, round_trip_ok, data["pickling"]["bytes"]
            ),
        }
    return summary


# Text


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(row) for row in rows]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = (str(cell).rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def fmt_us(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


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


def node_choice_lines(results: Mapping[str, Any]) -> list[str]:
    """What choosing a key's node costs the pymemcache-based backends, and why it differs."""
    choice = results["micro"]["node_choice"]["hasher.get_node"]
    names = results["micro"]["node_names"]
    ours, elasti = choice[OURS_PYMEMCACHE], choice["elastipymemcache"]

    def named(name: str) -> str:
        first = names[name][0]
        return f'"{first}-<key>", {len(first) + 1} characters and the key'

    return [
        f'pymemcache chooses a key\'s node in Python: a murmur3 hash of "node-key" for each '
        f"of the {len(names[OURS_PYMEMCACHE])} nodes, the highest wins. That takes "
        f"{ours:,.0f} ns a key in ours pymemcache, {elasti:,.0f} ns in django-elastipymemcache "
        f"and {choice['pymemcache']:,.0f} ns in PyMemcacheCache, so {ours * 100 / 1e3:,.0f} µs "
        f"and {elasti * 100 / 1e3:,.0f} µs of a get_many(100): ours names its nodes by "
        f"hostname, hashing {named(OURS_PYMEMCACHE)}; django-elastipymemcache by IP, hashing "
        f"{named('elastipymemcache')}.",
    ]


TLS_SHORT = {
    OURS_TLS: "ours pymemcache, TLS",
    OURS_PYMEMCACHE: "ours pymemcache, clear",
    ELASTI_TLS: "elastipymemcache, TLS",
    "elastipymemcache": "elastipymemcache, clear",
}

TLS_OWNER = {OURS_TLS: "Our pymemcache backend", ELASTI_TLS: "django-elastipymemcache"}

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


def fmt_added(value: float) -> str:
    return f"{value:+.1f}" if abs(value) < 1000 else f"{value:+,.0f}"


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
        f"TLS made our pymemcache backend's operations {tuning.geometric_mean(ratios):.2f}x "
        f"as slow on geometric mean, from {cheapest:.2f}x to {dearest:.2f}x."
    )


CONNECTION_HEADER = [
    "backend",
    "build ms",
    "discovery ms",
    "first node ms",
    "other nodes ms",
    "all three ms",
    "warm get µs",
    "RSS MiB",
]


def connection_rows(summary: Mapping[str, Any]):
    for name, metrics in summary["tls"]["connections"].items():
        yield [
            TLS_SHORT[name],
            f"{metrics['build_ms']:.2f}",
            f"{metrics['discovery_ms']:.2f}",
            f"{metrics['first_node_ms']:.2f}",
            f"{metrics['other_nodes_ms']:.2f}",
            f"{metrics['connections_ms']:.2f}",
            f"{metrics['warm_get_ms'] * 1000:.0f}",
            f"{metrics['rss_after_kib'] / 1024:.1f}",
        ]


def first_request_lines(results: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    connections = summary["tls"]["connections"]
    nodes = results["tls"]["nodes"]
    lines = []
    for tls, clear in TLS_PAIRS.items():
        first = summary["tls"]["first_request"][tls]
        added = first["added_ms"]
        lines.append(
            f"{TLS_OWNER[tls]}: with TLS, discovery and the first connection to "
            f"each of the {nodes} nodes take {connections[tls]['connections_ms']:.1f} ms "
            f"against {connections[clear]['connections_ms']:.1f} ms in clear text, "
            f"{first['ratio']:.1f}x, {added['connections_ms']:+.1f} ms: discovery "
            f"{added['discovery_ms']:+.2f} ms, the first node {added['first_node_ms']:+.2f} "
            f"ms, the other {nodes - 1} {added['other_nodes_ms']:+.2f} ms; building the "
            f"backend, its TLS context included, {added['build_ms']:+.2f} ms."
        )
    return lines


def tls_notes(results: Mapping[str, Any]) -> list[str]:
    """How the TLS contenders were set up, and what the TLS cluster did besides."""
    data = results["tls"]
    reply = data["endpoint_reply_ms"]
    pipelined = data["pipelining"]
    memcached = results["machine"]["memcached"]
    tls_us = {case: data["median_us"] for case, data in results["summary"]["tls"]["cases"].items()}
    return [
        "django-elastipymemcache has no TLS option of its own, but its OPTIONS reach "
        "pymemcache's ``HashClient``, whose ``tls_context`` covers every node and the "
        "configuration endpoint. It connects to the nodes' IPs by default, which their "
        "certificates do not name, so verification fails; with ``use_vpc_ip_address`` False "
        "it connects by hostname, which here a ``socket_module`` resolves as DNS would.",
        f"Sent to one node in one write, as pymemcache's ``set_many`` sends a node its keys, "
        f"{pipelined['clear']['sets']} sets of {pipelined['clear']['bytes'] // 1024} KB "
        f"in all were answered in {pipelined['clear']['ms']:.1f} ms in clear text; over TLS "
        f"memcached {memcached} answered {pipelined['tls']['stored']} and then nothing "
        f"until the client gave up after {pipelined['tls']['ms']:.0f} ms. A ``set_many`` "
        "carrying a few tens of KB to one node therefore times out over TLS against this "
        "memcached, with any pymemcache-based backend; the TLS rounds fill their values one "
        "``set`` at a time, and the ``set_many(100)`` of 100 B timed (about 5 KB a node) "
        "was answered.",
        "django-elastipymemcache leaves pymemcache's ``no_delay`` at its default, off "
        "(Nagle's algorithm on); ours turns it on. Over TLS its set of 500 KB took "
        f"{fmt_us(tls_us['set 500 KB'][ELASTI_TLS])} µs, ours "
        f"{fmt_us(tls_us['set 500 KB'][OURS_TLS])} µs.",
        f"The emulated configuration endpoint answered ``config get cluster`` over TLS in "
        f"{reply['tls']:.1f} ms, and in {reply['tls, TCP_NODELAY']:.2f} ms once "
        f"``TCP_NODELAY`` was set on its connections ({reply['clear']:.2f} ms in clear text): "
        "without it, its reply waits behind the TLS 1.3 session tickets it sent after the "
        "handshake until the client's delayed acknowledgement. That is the emulator's Python "
        "server, not TLS, so the connection figures above were taken with ``TCP_NODELAY`` "
        "set, as memcached sets it on its own connections.",
    ]


def probe_rows(summary: Mapping[str, Any]):
    for name, metrics in summary["probes"].items():
        yield [
            SHORT[name],
            f"{metrics['import_ms']:.1f}",
            f"{metrics['build_ms']:.2f}",
            f"{metrics['first_get_ms']:.2f}",
            f"{metrics['first_request_ms']:.1f}",
            f"{metrics['warm_get_ms'] * 1000:.0f}",
            f"{metrics['rss_after_kib'] / 1024:.1f}",
            f"{metrics['rss_growth_kib'] / 1024:.1f}",
        ]


PROBE_HEADER = [
    "backend",
    "import ms",
    "build ms",
    "first get ms",
    "all three ms",
    "warm get µs",
    "RSS MiB",
    "RSS growth MiB",
]


def pieces_rows(results: Mapping[str, Any]):
    for what, by_cache in results["micro"]["pieces"].items():
        yield [what, *(f"{by_cache[name]:.0f}" for name in by_cache)]


def pieces_header(results: Mapping[str, Any]) -> list[str]:
    first = next(iter(results["micro"]["pieces"].values()))
    return ["ns per call", *(SHORT[name] for name in first)]


REAL_CASE = {
    "get": "get 100 B",
    "set": "set 100 B",
    "get_many(100)": "get_many(100) 100 B",
    "set_many(100)": "set_many(100) 100 B",
    "incr": "incr",
    "delete": "delete",
}
"""The measured operation each stubbed call is compared with."""

LAYER_HEADER = [
    "stubbed call",
    "ours ns",
    "stock ns",
    "ours - stock ns",
    "ours real µs",
    "raw pylibmc real µs",
    "Python share of ours",
]


def layer_rows(results: Mapping[str, Any], summary: Mapping[str, Any]):
    """The Python of each call with a stub client, next to the real call it is part of."""
    us = summary["median_us"][MAIN]
    for what, by_cache in results["micro"]["calls"].items():
        real = us[REAL_CASE[what]]
        yield [
            what,
            f"{by_cache[OURS]:,.0f}",
            f"{by_cache[BASELINE]:,.0f}",
            f"{by_cache[OURS] - by_cache[BASELINE]:+,.0f}",
            fmt_us(real[OURS]),
            fmt_us(real["raw"]),
            f"{by_cache[OURS] / 1e3 / real[OURS] * 100:.0f}%",
        ]


def tuning_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Operations down, candidates across: seven columns fit where ten would not."""
    candidates = results["summary"]["tuning"]
    rows = [
        [case, *(fmt_ratio(data["per_case"][case]) for data in candidates.values())]
        for case in results["tuning"]["cases"]
    ]
    rows.append(["overall", *(fmt_ratio(data["geometric_mean"]) for data in candidates.values())])
    return ["operation", *candidates], rows


def decision_lines(summary: Mapping[str, Any]) -> list[str]:
    return [f"{name}: {data['decision']}." for name, data in summary["tuning"].items()]


TARGET_HEADER = ["target", "met", "worst case", "ratio", "quartiles"]


def target_rows(summary: Mapping[str, Any]):
    for target in summary["targets"]:
        first, third = target["quartiles"]
        yield [
            target["target"],
            "yes" if target["met"] else "no",
            target["where"],
            fmt_ratio(target["worst"]),
            f"{first:.2f}-{third:.2f}",
        ]


def versus_stock_line(summary: Mapping[str, Any]) -> str:
    overall = summary["versus_stock_overall"]
    return (
        f"Ours was faster than stock on {overall['faster']} of the {overall['operations']} "
        f"operations measured, {overall['geometric_mean']:.2f}x on geometric mean."
    )


def discovery_ms(summary: Mapping[str, Any]) -> float:
    """What ours adds to the first get of a process: discovery, over stock's connecting."""
    probes = summary["probes"]
    return probes[OURS]["first_get_ms"] - probes[BASELINE]["first_get_ms"]


def overhead_lines(results: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    """Where the Python in front of pylibmc spends its time, in plain words."""
    pieces = results["micro"]["pieces"]
    layer = results["micro"]["calls"]
    keys = pieces["make_and_validate_key"]
    check_ns = pieces["_cache"][OURS] - pieces["_cache"][BASELINE]
    us = summary["median_us"][MAIN]
    many = "get_many(100) 100 B"
    overrides = ", ".join(f"``{name}``" for name in results["ours_overrides"]) or "nothing"
    return [
        f"Node-list check: ours' ``_cache`` takes {pieces['_cache'][OURS]:.0f} ns, stock's "
        f"{pieces['_cache'][BASELINE]:.0f} ns; the {check_ns:.0f} ns more is "
        f"{check_ns / 1e3 / us['get 100 B'][BASELINE] * 100:.2f}% of a 100 B get here.",
        f"Key making and validation: {keys[OURS]:,.0f} ns per key in ours, "
        f"{keys[BASELINE]:,.0f} ns in stock (Django's), so {100 * keys[OURS] / 1e3:,.0f} µs "
        f"and {100 * keys[BASELINE] / 1e3:,.0f} µs of a get_many(100).",
        f"With the client stubbed, a get is {layer['get'][OURS]:,.0f} ns of Python in ours "
        f"and {layer['get'][BASELINE]:,.0f} ns in stock; of the methods Django's backend "
        f"has, ours overrides {overrides}.",
        f"get_many(100) of 100 B takes ours {fmt_us(us[many][OURS])} µs, stock "
        f"{fmt_us(us[many][BASELINE])} µs and raw pylibmc, given ready keys, "
        f"{fmt_us(us[many]['raw'])} µs.",
    ]


def text(results: Mapping[str, Any]) -> str:
    summary = results["summary"]
    names = list(results["contenders"])
    machine = results["machine"]
    parts = [
        f"{results['command']}  ({results['duration_seconds']} s)",
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
        f"Django {machine['versions']['Django']}, pylibmc {machine['versions']['pylibmc']} "
        f"(libmemcached {machine['libmemcached']}), memcached {machine['memcached']}; "
        f"load {results['load_before']} -> {results['load_after']}",
        "",
        f"Median µs per call, {MAIN}-node cluster",
        table(["operation", *(SHORT[n] for n in names)], operations_rows(summary, MAIN, names)),
        "",
        "Ours relative to each (speed ratio; above 1: ours is faster)",
        table(RATIO_HEADER, ratio_rows(summary, MAIN)),
        "",
        "get_many(100): median µs per call by cluster size",
        table(
            ["case", *(SHORT[n] for n in names), "ours vs elastipymemcache"],
            scaling_rows(summary, names),
        ),
        "",
        "pymemcache backend: median µs per call, and its speed relative to each",
        table(PYMEMCACHE_HEADER, pymemcache_rows(summary)),
        f"  {pymemcache_line(summary)}",
        *(f"  {line}" for line in node_choice_lines(results)),
        "",
        f"TLS cost, {results['tls']['nodes']}-node clusters, {results['tls']['rounds']} rounds: "
        "times with TLS relative to clear text, same backend",
        table(TLS_HEADER, tls_rows(summary)),
        f"  {tls_cost_line(summary)}",
        f"  {tls_parity_line(summary)}",
        "",
        f"Discovery and first connections in a fresh process (median of "
        f"{results['tls']['probes']['rounds']})",
        table(CONNECTION_HEADER, connection_rows(summary)),
        *(f"  {line}" for line in first_request_lines(results, summary)),
        *(f"  {line}" for line in tls_notes(results)),
        "",
        "Targets (worst case; quartiles of its per-round ratios)",
        table(TARGET_HEADER, target_rows(summary)),
        f"  {versus_stock_line(summary)}",
        "",
        f"First request and memory (fresh process, median of {results['probes']['rounds']}; "
        f"RSS after building and {results['probes']['sets']} sets)",
        table(PROBE_HEADER, probe_rows(summary)),
        f"  discovery adds {discovery_ms(summary):.2f} ms to ours' first get",
        "",
        "Per-call overhead: pieces, and whole calls with the client stubbed out",
        table(pieces_header(results), pieces_rows(results)),
        "",
        table(LAYER_HEADER, layer_rows(results, summary)),
        *(f"  {line}" for line in overhead_lines(results, summary)),
        "",
        "Tuning: our backend with each candidate, speed relative to the faster of two instances "
        "with the current defaults (the control: relative to the reference)",
        table(*tuning_table(results)),
        *(f"  {line}" for line in decision_lines(summary)),
        *(f"  {line}" for line in round_trip_lines(results)),
    ]
    warnings = [
        f"WARNING: memcached evicted {cluster['evictions']} values on the {nodes}-node cluster"
        for nodes, cluster in results["clusters"].items()
        if cluster["evictions"]
    ] + [
        f"WARNING: memcached evicted {count} values on the {kind} cluster of the TLS rounds"
        for kind, count in results["tls"]["evictions"].items()
        if count
    ]
    return "\n".join([*parts, *warnings])


def round_trip_lines(results: Mapping[str, Any]) -> list[str]:
    """Each round trip's count, and what the comparison with stock's says about the rest."""
    checks = results["tuning"]["round_trip"]
    lines = []
    for mode, check in checks.items():
        mismatches = (
            f"; mismatches: {', '.join(check['mismatches'])}" if check["mismatches"] else ""
        )
        lines.append(
            f"Round trip through {mode}: {check['identical']}/{check['values']} values "
            f"identical{mismatches}."
        )
    pickling = results["tuning"]["pickling"]
    lines.append(
        "The 10 KB object by pickle protocol (-1, the highest, is pylibmc's default): "
        + "; ".join(
            f"{protocol}: {pickling['bytes'][protocol]:,} B, pickle.dumps + pickle.loads "
            f"{pickling['us'][protocol]:.0f} µs"
            for protocol in pickling["bytes"]
        )
        + "."
    )
    ours, stock = checks[tuning.OURS_TEXT], checks[tuning.STOCK_TEXT]
    if ours["mismatches"] and ours["mismatches"] == stock["mismatches"]:
        lines.append(
            "Django's own PyLibMCCache changes the same values, so that is pylibmc's doing "
            "(it stores a bool as an integer), not the protocol's nor this backend's."
        )
    return lines


# Files


REPOSITORY = Path(__file__).resolve().parent.parent


def save(results: dict[str, Any], out: Path, chart: Path | None, rst: Path | None) -> None:
    results["summary"] = summarize(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if chart is not None:
        draw_chart(results, chart)
    if rst is not None:
        rst.write_text(restructured_text(results, chart))


def image_path(chart: Path) -> str:
    """The chart as README.rst, at the top of the repository, refers to it."""
    try:
        return chart.resolve().relative_to(REPOSITORY).as_posix()
    except ValueError:
        return str(chart)


def draw_chart(results: Mapping[str, Any], path: Path) -> None:
    """One bar group per operation, one bar per contender, speed relative to stock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versus = results["summary"]["versus_stock"]
    cases = list(versus)
    names = [name for name in results["contenders"] if name != BASELINE]
    width = 0.8 / len(names)
    figure, axes = plt.subplots(figsize=(16, 6.5), dpi=100)
    for index, name in enumerate(names):
        offsets = [i + (index - (len(names) - 1) / 2) * width for i in range(len(cases))]
        heights = [versus[case][name] for case in cases]
        axes.bar(offsets, heights, width, label=results["contenders"][name])
        for offset, height in zip(offsets, heights, strict=True):
            if height < TINY_BAR:
                axes.annotate(
                    f"{height:.2f}",
                    (offset, height),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    axes.axhline(1.0, color="black", linewidth=0.8, label=results["contenders"][BASELINE])
    axes.set_xticks(range(len(cases)), cases, rotation=40, ha="right")
    axes.set_ylabel("speed / stock PyLibMCCache")
    axes.set_title(CHART_TITLE)
    columns = min(len(names) + 1, LEGEND_COLUMNS)
    axes.legend(ncols=columns, loc="upper center", bbox_to_anchor=(0.5, -0.32))
    axes.grid(axis="y", alpha=0.3)
    axes.set_xlim(-0.6, len(cases) - 0.4)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


# reStructuredText


RST_WIDTH = 88


def rst_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A simple table, readable as plain text in README.rst too."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * width for width in widths)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    return [rule, line(header).rstrip(), rule, *(line(row).rstrip() for row in rows), rule, ""]


def paragraph(text: str) -> list[str]:
    return [*textwrap.wrap(text, RST_WIDTH, break_long_words=False, break_on_hyphens=False), ""]


def bullets(items: Iterable[str]) -> list[str]:
    lines = []
    for item in items:
        lines += textwrap.wrap(
            item,
            RST_WIDTH,
            initial_indent="* ",
            subsequent_indent="  ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    return [*lines, ""]


def section(title: str) -> list[str]:
    return [title, "-" * len(title), ""]


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
    tuned = summary["tuning"]["tcp_nodelay off"]["per_case"]["set 500 KB"]
    many = "set_many(100) 100 B"
    return [
        f"Django's ``PyLibMCCache`` with pylibmc's default behaviours (``tcp_nodelay`` off) "
        f"takes {fmt_us(us['set 500 KB']['stock_defaults'])} µs for a 500 KB set, against "
        f"{fmt_us(us['set 500 KB'][BASELINE])} µs with ours; on our backend, turning "
        f"``tcp_nodelay`` off makes that set {1 / tuned:.0f}x slower.",
        f"{many} takes ours {fmt_us(us[many][OURS])} µs, raw pylibmc "
        f"{fmt_us(us[many]['raw'])} µs and django-elastipymemcache "
        f"{fmt_us(us[many]['elastipymemcache'])} µs: pylibmc's ``set_multi`` waits for each "
        f"key's reply in turn, pymemcache sends each node its keys together.",
    ]


def restructured_text(results: Mapping[str, Any], chart: Path | None) -> str:
    summary = results["summary"]
    names = list(results["contenders"])
    lines = [
        "Performance",
        "===========",
        "",
        *paragraph(
            "Measured with ``benchmarks/run.py`` on local clusters of real memcached nodes "
            "behind an emulated configuration endpoint "
            "(``django_elasticache.testing.LocalCluster``), so the round trips are loopback "
            "ones: the client-side costs weigh more than they would over a network. Every "
            "contender runs in the same process, rounds interleaved; a ratio is the median "
            "over rounds of the per-round speed ratio, above 1 when ours is faster. The "
            "baseline, *stock*, is Django's ``PyLibMCCache`` given the node list and our "
            "pylibmc behaviours; *raw pylibmc* is ``pylibmc.Client`` called with finished "
            "Django keys. *ours pymemcache* is this package's pymemcache backend with its "
            "own defaults. The other pymemcache-based backends get the same 1 s timeouts as "
            "ours, and django-elastipymemcache its README's auto-discovery settings."
        ),
        "::",
        "",
        f"    {results['command']}    # {results['duration_seconds']:.0f} s, "
        f"{results['settings']['rounds']} rounds",
        "",
        *paragraph(machine_line(results)),
        *section(f"Operations, {MAIN}-node cluster"),
        *paragraph(
            "Speed of ours relative to each contender; *ours µs* is the median time of one call."
        ),
        *rst_table(RATIO_HEADER, ratio_rows(summary, MAIN)),
        *bullets(notes(summary)),
        *section("get_many(100) from 1 to 10 nodes"),
        *paragraph("Median µs per call, and the speed of ours relative to elastipymemcache."),
        *rst_table(
            ["case", *(SHORT[n] for n in names), "ours vs elastipymemcache"],
            scaling_rows(summary, names),
        ),
        *section("pymemcache backend"),
        *paragraph(
            "Our pymemcache backend, ``django_elasticache.pymemcache.ElastiCache``, on the "
            "clusters above and in the same rounds: median µs per call, and its speed "
            "relative to django-elastipymemcache, Django's ``PyMemcacheCache`` and our pylibmc "
            "backend. " + pymemcache_line(summary)
        ),
        *rst_table(PYMEMCACHE_HEADER, pymemcache_rows(summary)),
        *bullets(node_choice_lines(results)),
        *section("TLS cost"),
        *paragraph(
            f"Our pymemcache backend with ``OPTIONS['TLS']`` on a {results['tls']['nodes']}-node "
            "``LocalCluster(tls=True)`` (nodes and endpoint TLS only, certificates from a "
            "throwaway CA, verified with hostnames), and the same backend on an otherwise "
            "identical clear-text cluster, in the same interleaved rounds "
            f"({results['tls']['rounds']}); django-elastipymemcache likewise. *TLS / clear* is "
            "the median of the per-round ratios of the times, above 1 when TLS is slower; "
            "*TLS adds* the median of the per-round differences; the last two columns are "
            "the speed of ours relative to django-elastipymemcache, with TLS and without. "
            + tls_cost_line(summary)
            + " "
            + tls_parity_line(summary)
        ),
        *rst_table(TLS_HEADER, tls_rows(summary)),
        *paragraph(
            f"In a fresh process (median of {results['tls']['probes']['rounds']}, rounds "
            "interleaved): building the backend; discovery, the first ``cache._cache``; the "
            "first node's connection, the first ``get`` less a warm one; the other nodes', "
            f"the first ``get_many`` of {results['tls']['probes']['spread_keys']} keys less a "
            "warm one; the three together; and resident memory after them."
        ),
        *rst_table(CONNECTION_HEADER, connection_rows(summary)),
        *bullets([*first_request_lines(results, summary), *tls_notes(results)]),
        *section("Targets"),
        *paragraph(
            "Each target's worst case, with the quartiles of its per-round ratios: when they "
            "straddle the bound, the pass or the miss is within the noise of a shared machine. "
            + versus_stock_line(summary)
        ),
        *rst_table(TARGET_HEADER, target_rows(summary)),
        *section("First request, memory, per-call overhead"),
        *paragraph(
            f"In a fresh process (median of {results['probes']['rounds']}): importing the "
            "backend, building it, its first ``get`` (connections, and discovery for the "
            "discovering backends), a warm ``get``, and resident memory (VmRSS) after "
            f"{results['probes']['sets']} sets of 1 KB. Discovery adds "
            f"{discovery_ms(summary):.2f} ms to ours' first request."
        ),
        *rst_table(PROBE_HEADER, probe_rows(summary)),
        *paragraph(
            "Per-call overhead in nanoseconds, timed without the network: the pieces, then "
            "whole calls with the client replaced by a stub that answers at once (the Python "
            "of Django and of the backend, nothing else), next to the real call."
        ),
        *rst_table(pieces_header(results), pieces_rows(results)),
        *rst_table(LAYER_HEADER, layer_rows(results, summary)),
        *bullets(overhead_lines(results, summary)),
        *section("Tuning"),
        *paragraph(
            "Our backend with one candidate pylibmc setting. The current defaults run twice, "
            "as the reference and as a control; the control's column is its speed relative "
            "to the reference, and its largest gap (at least "
            f"{tuning.ADOPT_AT:.2f}x) is the bar. A candidate's speed is counted against the "
            "faster of the two, per operation; *overall* is the geometric mean over the "
            "operations the setting can affect (the object rows for ``pickle_protocol``). A "
            "candidate is adopted only when it clears the bar overall, is nowhere slower by "
            "more than the bar, and has no cost that loopback cannot show."
        ),
        *rst_table(*tuning_table(results)),
        *bullets(
            [
                *decision_lines(summary),
                *round_trip_lines(results),
                "Compression: pylibmc compresses only when a call passes ``min_compress_len``, "
                "and Django's backends never do, so no threshold is set and none was measured.",
            ]
        ),
    ]
    if chart is not None:
        lines += [f".. image:: {image_path(chart)}", ""]
    return "\n".join(lines)
