"""
The results of a full run in their four forms: the JSON of every sample (with the
summary computed from them), the text for the terminal, the README section and the chart.
What each section says is in ``sections``; how a table is drawn, in ``tables``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import chart
import sections
import summary
import tables

REPOSITORY = Path(__file__).resolve().parent.parent


def save(results: dict[str, Any], out: Path, chart_path: Path | None, rst: Path | None) -> None:
    results["summary"] = summary.summarize(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if chart_path is not None:
        chart.draw(results, chart_path)
    if rst is not None:
        rst.write_text(restructured_text(results, chart_path))


def text(results: Mapping[str, Any]) -> str:
    machine = results["machine"]
    heading = (
        f"{results['command']}  ({results['duration_seconds']} s)\n"
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
        f"Django {machine['versions']['Django']}, pylibmc {machine['versions']['pylibmc']} "
        f"(libmemcached {machine['libmemcached']}), memcached {machine['memcached']}; "
        f"load {results['load_before']} -> {results['load_after']}"
    )
    return "\n\n".join(
        [heading, tables.text(sections.main_sections(results)), *eviction_warnings(results)]
    )


def eviction_warnings(results: Mapping[str, Any]) -> list[str]:
    """Non-zero evictions mean some timed "hits" were misses."""
    return [
        f"WARNING: memcached evicted {cluster['evictions']} values on the {nodes}-node cluster"
        for nodes, cluster in results["clusters"].items()
        if cluster["evictions"]
    ] + [
        f"WARNING: memcached evicted {count} values on the {kind} cluster of the TLS rounds"
        for kind, count in results["tls"]["evictions"].items()
        if count
    ]


INTRODUCTION = (
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
)


def restructured_text(results: Mapping[str, Any], chart_path: Path | None) -> str:
    lines = [
        "Performance",
        "===========",
        "",
        *tables.paragraph(INTRODUCTION),
        "::",
        "",
        f"    {results['command']}    # {results['duration_seconds']:.0f} s, "
        f"{results['settings']['rounds']} rounds",
        "",
        *tables.paragraph(sections.machine_line(results)),
        tables.rst(sections.main_sections(results)),
    ]
    if chart_path is not None:
        lines += [f".. image:: {image_path(chart_path)}", ""]
    return "\n".join(lines)


def image_path(chart_path: Path) -> str:
    """The chart as README.rst, at the top of the repository, refers to it."""
    try:
        return chart_path.resolve().relative_to(REPOSITORY).as_posix()
    except ValueError:
        return str(chart_path)
