"""
Every figure the reports show, computed once from the samples and kept in the JSON with
them: medians, speed ratios, the targets' verdicts, and the TLS figures.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import targets
from backends import BASELINE, TLS_PAIRS
from stats import geometric_mean, micros, minus, speed

OURS = "ours"
OURS_PYMEMCACHE = "ours_pymemcache"
OURS_TLS = "ours_pymemcache_tls"
ELASTI_TLS = "elastipymemcache_tls"
MAIN = "3"
COMPARED = (BASELINE, "raw", "elastipymemcache", "pymemcache")
"""The contenders ours is compared with, in column order."""
PYMEMCACHE_COMPARED = ("elastipymemcache", "pymemcache", OURS)
"""What our pymemcache backend is compared with, in column order."""


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
        "targets": targets.speed_targets(clusters),
        **(
            {"hotpath_targets": targets.hotpath_targets(results["hotpaths"])}
            if "hotpaths" in results
            else {}
        ),
        **(
            {"network_targets": targets.network_targets(results["network"])}
            if "network" in results
            else {}
        ),
        "versus_stock_overall": versus_stock_overall(clusters),
        "pymemcache_overall": overall(clusters, OURS_PYMEMCACHE, "elastipymemcache"),
        "tls": summarize_tls(results["tls"]),
    }


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
        "geometric_mean": geometric_mean(ratios),
    }


def summarize_tls(data: Mapping[str, Any]) -> dict[str, Any]:
    """
    Per operation, each TLS contender against its clear-text twin: the median of the
    per-round ratios of their times (above 1: TLS is slower) and of the per-round
    differences; and our pymemcache backend against django-elastipymemcache, each side
    with TLS and each without.
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
    return {"cases": cases}
