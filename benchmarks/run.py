"""
Benchmark ``django_elasticache.memcached.ElastiCache`` against the other ways of using an
ElastiCache memcached cluster from Django, on local clusters of 1, 3 and 10 real memcached
nodes behind an emulated configuration endpoint (``django_elasticache.testing``).

Usage::

    python benchmarks/run.py                # full run, about 4 minutes on 2 cores
    python benchmarks/run.py --quick        # smoke test: few rounds, writes JSON only
    python benchmarks/run.py --rounds 9 --out results.json --chart chart.png --rst RESULTS.rst

Needs memcached on PATH and ``pip install -e .[bench]`` (matplotlib, pymemcache,
django-elastipymemcache). Writes a table to stdout, every sample to ``--out`` (default
``benchmarks/results/latest.json``), and, unless ``--quick``, the chart to ``--chart``
(``benchmarks/results/chart.png``) and the README section to ``--rst``
(``benchmarks/RESULTS.rst``).

Contenders (``backends.py``): our ``ElastiCache`` (LOCATION the configuration endpoint);
our pymemcache twin, ``django_elasticache.pymemcache.ElastiCache``, through the same
endpoint; Django's ``PyLibMCCache`` on the static node list with our pylibmc behaviours, the
baseline of every ratio; Django's
``PyMemcacheCache``; ``django-elastipymemcache`` through the same endpoint; raw
``pylibmc.Client`` calls with finished Django keys (":1:key"), the floor.

TLS: on a ``LocalCluster(tls=True)``, our pymemcache backend with ``OPTIONS["TLS"]`` and
django-elastipymemcache given pymemcache's ``tls_context``, each timed in the same
interleaved rounds as its clear-text twin, the same backend on an otherwise identical
clear-text cluster.

Method: each measurement is a fixed number of calls (calibrated once per operation and
contender to last about 40 ms) timed with ``time.perf_counter``; rounds interleave the
contenders in rotated order, and a ratio is the median over rounds of the per-round ratio,
so a slow stretch of the shared machine falls on both sides of it. Ratios are speeds: above
1 means ours is faster. Then the hot paths beside raw clients (``hotpaths.py``).

Then ``network.py``: the operations where round trips count, on a cluster whose relay
adds 300 µs to every round trip, against its twin without. Last, ``request_cycle.py``:
Django's request cycle (``caches[alias]``, then ``close_caches()``) in WSGI-style threads
and ASGI-style contexts, the connections it opens, ``aget`` against ``get``, 50 concurrent
ASGI requests, and the crash cases of a shared backend instance.

Whatever ``ElastiCache`` overrides (key validation, say) is picked up on the next run: the
benchmark calls the public cache API.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hotpaths
import machine
import network
import report
import request_cycle
import workloads
from backends import (
    CONTENDERS,
    TLS_CONTENDERS,
)
from workloads import Case, Deadline

from django_elasticache.testing import LocalCluster

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "latest.json"
DEFAULT_CHART = HERE / "results" / "chart.png"
DEFAULT_RST = HERE / "RESULTS.rst"

MAIN_NODES = 3
SCALING_NODES = (1, 10)
DEFAULT_ROUNDS = 9
QUICK_ROUNDS = 3
TARGET_SECONDS = 0.04
"""About how long one measurement lasts (one contender, one operation, one round)."""
QUICK_TARGET_SECONDS = 0.01
TLS_ROUNDS = 7
"""Rounds of the TLS comparison, which has its own pair of clusters."""
HOTPATH_CALLS = 200
"""Calls per round of each hot-path contender (``hotpaths``)."""
WARM_KEYS = [f"bench:warm:{i}" for i in range(64)]
"""Enough keys for every node of every cluster to hold some."""
MAX_SECONDS = 600.0
"""Hard stop for a run that has gone wrong; a normal full run takes about 4 minutes."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few short rounds: a smoke test")
    parser.add_argument("--rounds", type=int, help=f"rounds per measurement ({DEFAULT_ROUNDS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file of all samples")
    parser.add_argument("--chart", type=Path, help=f"PNG chart (default {DEFAULT_CHART})")
    parser.add_argument("--rst", type=Path, help=f"README section (default {DEFAULT_RST})")
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="hard time limit")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not args.quick:
        args.chart = args.chart or DEFAULT_CHART
        args.rst = args.rst or DEFAULT_RST
    return args


def build_all(cluster: LocalCluster) -> dict[str, Any]:
    """Every contender, built and connected, so that no first call is timed."""
    targets = {contender.name: contender.build(cluster) for contender in CONTENDERS}
    warm_up(CONTENDERS, targets)
    return targets


def warm_up(contenders: Sequence[Any], targets: dict[str, Any]) -> None:
    """Discover and connect to every node, with a get_many of keys on all of them."""
    for contender in contenders:
        calls = contender.calls(targets[contender.name])
        calls.get_many([calls.key(key) for key in WARM_KEYS])


def run_operations(
    cluster: LocalCluster, cases: list[Case], args: argparse.Namespace, deadline: Deadline
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time the cases on every contender; return the samples and the built backends."""
    targets = build_all(cluster)
    contenders = {c.name: c.calls(targets[c.name]) for c in CONTENDERS}
    measured = workloads.measure(cases, contenders, args.rounds, target_seconds(args), deadline)
    return {
        "nodes": len(cluster.nodes),
        "cases": {
            case.name: {"calls": measured.calls[case.name], "seconds": measured.seconds[case.name]}
            for case in cases
        },
        "evictions": evictions(cluster),
    }, targets


def target_seconds(args: argparse.Namespace) -> float:
    return QUICK_TARGET_SECONDS if args.quick else TARGET_SECONDS


def evictions(cluster: LocalCluster) -> int:
    """Values memcached dropped for room: non-zero would mean some "hits" were misses."""
    import pylibmc

    client = pylibmc.Client(cluster.node_addresses)
    try:
        return sum(int(stats.get("evictions", 0)) for _, stats in client.get_stats())
    finally:
        client.disconnect_all()


def run_tls(args: argparse.Namespace, deadline: Deadline, started: float) -> dict[str, Any]:
    """
    The TLS contenders on a TLS cluster and their clear-text twins on a clear-text one, in
    the same interleaved rounds.
    """
    rounds = min(args.rounds, TLS_ROUNDS)
    with (
        LocalCluster(nodes=MAIN_NODES, tls=True, relay=False) as tls_cluster,
        LocalCluster(nodes=MAIN_NODES, relay=False) as clear_cluster,
    ):
        clusters = {c.name: tls_cluster if c.tls else clear_cluster for c in TLS_CONTENDERS}
        progress(started, f"TLS: {MAIN_NODES} nodes with TLS and {MAIN_NODES} without")
        targets = {c.name: c.build(clusters[c.name]) for c in TLS_CONTENDERS}
        warm_up(TLS_CONTENDERS, targets)
        calls = {c.name: c.calls(targets[c.name]) for c in TLS_CONTENDERS}
        cases = workloads.tls_cases()
        # One set at a time to fill the pools: memcached stalls on a burst of pipelined
        # sets over TLS (see django_elasticache.pipeline).
        measured = workloads.measure(
            cases, calls, rounds, target_seconds(args), deadline, pipelined_setup=False
        )
        tls_evictions = sum(pymemcache_evictions(targets[c.name]) for c in TLS_CONTENDERS if c.tls)
        return {
            "nodes": MAIN_NODES,
            "rounds": rounds,
            "contenders": {c.name: c.label for c in TLS_CONTENDERS},
            "cases": {
                case.name: {
                    "calls": measured.calls[case.name],
                    "seconds": measured.seconds[case.name],
                }
                for case in cases
            },
            "evictions": {"tls": tls_evictions, "clear": evictions(clear_cluster)},
        }


def pymemcache_evictions(cache: Any) -> int:
    """Evictions on every node a pymemcache-based backend reaches, over its connections:
    a ``HashClient``'s node clients, or a client borrowed from each of our node pools."""
    client = cache._cache
    if hasattr(client, "clients"):
        return sum(int(node.stats().get(b"evictions", 0)) for node in client.clients.values())
    evictions = 0
    for pool in client.pools:
        with pool.client(lambda error: False) as node:
            evictions += int(node.stats().get(b"evictions", 0))
    return evictions


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Stopped clusters are meant to be gone; a background refresh finding one so is not news.
    logging.getLogger("django_elasticache").setLevel(logging.ERROR)
    started = time.monotonic()
    deadline = Deadline(args.max_seconds)
    results: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "settings": {
            "rounds": args.rounds,
            "target_seconds": target_seconds(args),
            "quick": args.quick,
        },
        "machine": machine.describe(),
        "load_before": machine.load_average(),
        "contenders": {contender.name: contender.label for contender in CONTENDERS},
        "clusters": {},
    }
    with LocalCluster(nodes=MAIN_NODES, relay=False) as cluster:
        progress(started, f"{MAIN_NODES} nodes: operations")
        operations, _ = run_operations(cluster, workloads.main_cases(), args, deadline)
        results["clusters"][str(MAIN_NODES)] = operations
    for nodes in SCALING_NODES:
        with LocalCluster(nodes=nodes, relay=False) as cluster:
            progress(started, f"{nodes} node(s): get_many(100)")
            operations, _ = run_operations(cluster, workloads.scaling_cases(), args, deadline)
            results["clusters"][str(nodes)] = operations
    results["tls"] = run_tls(args, deadline, started)
    progress(started, "hot paths beside raw clients")
    results["hotpaths"] = hotpaths.run(args.rounds, HOTPATH_CALLS)
    progress(started, f"over a network: {network.DEFAULT_LATENCY * 1e6:.0f} µs added")
    results["network"] = network.run(
        network.DEFAULT_LATENCY, min(args.rounds, network.DEFAULT_ROUNDS), deadline=deadline
    )
    results["requests"] = request_cycle.run(
        min(args.rounds, request_cycle.ROUNDS), lambda what: progress(started, what)
    )
    results["load_after"] = machine.load_average()
    results["duration_seconds"] = round(time.monotonic() - started, 1)
    report.save(results, args.out, args.chart, args.rst)
    print(report.text(results))
    return 0


def progress(started: float, what: str) -> None:
    print(f"[{time.monotonic() - started:6.1f} s] {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
