"""
The operations where round trips count, over an emulated network instead of loopback: a
3-node ``LocalCluster(latency=...)`` whose relay adds ``--latency`` (default 300 µs, a
same-AZ round trip in a VPC) to every round trip with a node or the endpoint.

    python benchmarks/network.py                    # about a minute
    python benchmarks/network.py --latency 0.0003 --rounds 5

Over loopback a round trip costs about 25 µs, so the other benchmarks weigh CPU; here an
operation costs about as many round trips as it waits for one after another, which is
what pipelining and sending to every node at once save. Contenders: ours (both backends)
and django-elastipymemcache through the configuration endpoint, Django's ``PyLibMCCache``
(with our behaviours) and ``PyMemcacheCache`` given the node list. Operations, on values
of 100 B: ``get_many(100)`` over the three nodes, ``set_many(100)``, ``delete_many(100)``,
the mixed workload (``set`` + ``get`` + ``get_many(20)`` per call, as in ``hotpaths``),
interleaved as in ``workloads``; and waves of 50 concurrent ASGI requests (``aset`` +
``aget`` each, ``request_cycle.concurrent_wave``).

The cluster runs in a child process: in this one its relay thread would compete with the
timed clients for the interpreter lock.

Round trips: every contender runs twice in the same interleaved rounds, on the cluster
with latency and on a twin without (the same relay, no delay); what the latency added to a
call, divided by what it added to a bare round trip (a meta no-op on a raw socket, timed
on both clusters), is the number of round trips the call waited for one after another.
The client's CPU and the relay's own hop cancel out, and so does the emulation's lateness
(its alarm wakes 50 to 100 µs late on a loaded machine): an operation that waits once for
every node's reply reads about 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import request_cycle
import workloads
from backends import BY_NAME, Addresses, addresses, elastipymemcache_options
from tables import Notes, Paragraph, Section, Table
from targets import network_targets, target_table
from wire import Addressed, connect
from workloads import Case, Deadline

from django_elasticache.options import parse_location
from django_elasticache.testing import LocalCluster

NODES = 3
DEFAULT_LATENCY = 0.0003
DEFAULT_ROUNDS = 7
TARGET_SECONDS = 0.05
"""About how long one measurement lasts (one contender, one operation, one round)."""
MAX_SECONDS = 300.0
BARE_ROUND_TRIPS = 50
"""Bare round trips timed on each cluster before the operations and again after them."""
TIMEOUT = 2.0
CHILD_TIMEOUT = 30.0
MIXED_BATCH = 20
CASES = (
    Case("get_many", 100, 100),
    Case("set_many", 100, 100),
    Case("delete_many", batch=100),
    Case("mixed", 100, MIXED_BATCH),
)
CONCURRENT_WAVES = 3
"""Waves of concurrent requests per round of the operations: a wave is one short sample."""
CONCURRENT = f"{request_cycle.CONCURRENT_REQUESTS} concurrent ASGI requests (aset + aget)"
CONTENDERS = ("ours", "ours_pymemcache", "stock", "pymemcache", "elastipymemcache")
LABELS = {
    "ours": "ours (pylibmc)",
    "ours_pymemcache": "ours (pymemcache)",
    "stock": "PyLibMCCache",
    "pymemcache": "PyMemcacheCache",
    "elastipymemcache": "django-elastipymemcache",
}
DISCOVERY_NOTE = (
    "django-elastipymemcache discovers the cluster in every new backend instance, so in "
    "every ASGI request: each of its requests waits for a discovery round trip too."
)
NEAR = " without latency"
"""Suffix of a contender's name on the twin cluster."""


def serve(latency: float) -> None:
    """In the child: run the cluster, print its addresses, stop when stdin closes."""
    with LocalCluster(nodes=NODES, latency=latency) as cluster:
        print(json.dumps(addresses(cluster).spec()), flush=True)
        sys.stdin.read()


@contextlib.contextmanager
def cluster_in_child(latency: float) -> Iterator[Addresses]:
    """A ``LocalCluster(latency=latency)`` in a child process, for as long as the block."""
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, "--serve", "--latency", repr(latency)]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster process exited with {child.wait(CHILD_TIMEOUT)}")
        yield Addresses(**json.loads(line))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def bare_round_trips(cluster: Addresses, count: int = BARE_ROUND_TRIPS) -> list[float]:
    """Seconds of ``count`` meta no-ops (``mn``), one after another, on one connection."""
    where = parse_location(cluster.node_addresses[0])
    node = Addressed(where.host, where.port, where.host)
    times = []
    with connect(node, None, TIMEOUT) as sock:
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(b"mn\r\n")
            reply = b""
            while not reply.endswith(b"MN\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    raise ConnectionError(f"{node!r} closed the connection after {reply!r}")
                reply += chunk
            times.append(time.perf_counter() - start)
    return times


def cache_entry(name: str, cluster: Addresses) -> dict[str, Any]:
    """A contender's ``CACHES`` entry, for the concurrent requests."""
    if name == "elastipymemcache":
        return {
            "BACKEND": "django_elastipymemcache.backend.ElastiPymemcache",
            "LOCATION": cluster.location,
            "OPTIONS": elastipymemcache_options(cluster),
        }
    backend = next(backend for backend in request_cycle.BACKENDS if backend.name == name)
    return backend.settings(cluster)


def run(
    latency: float = DEFAULT_LATENCY,
    rounds: int = DEFAULT_ROUNDS,
    target: float = TARGET_SECONDS,
    deadline: Deadline | None = None,
) -> dict[str, Any]:
    """Every case and the concurrent requests, on a cluster with ``latency`` added and on
    its twin without, in the same rounds."""
    deadline = deadline or Deadline(MAX_SECONDS)
    with cluster_in_child(latency) as far, cluster_in_child(0.0) as near:
        clusters = {name: far for name in CONTENDERS} | {name + NEAR: near for name in CONTENDERS}
        bare = {"far": bare_round_trips(far), "near": bare_round_trips(near)}
        calls = {}
        for name, cluster in clusters.items():
            contender = BY_NAME[name.removesuffix(NEAR)]
            calls[name] = contender.calls(contender.build(cluster))
            calls[name].get_many([f"warm-up:{i}" for i in range(30)])  # every node connected
        measured = workloads.measure(CASES, calls, rounds, target, deadline)
        entries = {name: cache_entry(name.removesuffix(NEAR), c) for name, c in clusters.items()}
        concurrent = request_cycle.measure_concurrency(entries, rounds * CONCURRENT_WAVES)
        bare["far"] += bare_round_trips(far)
        bare["near"] += bare_round_trips(near)
    seconds = {case.name: measured.seconds[case.name] for case in CASES}
    seconds[CONCURRENT] = {
        name: [per_request * request_cycle.CONCURRENT_REQUESTS for per_request in values]
        for name, values in concurrent["seconds"].items()
    }
    figures = {
        "latency": latency,
        "nodes": NODES,
        "rounds": rounds,
        "bare_round_trip": {where: statistics.median(times) for where, times in bare.items()},
        "calls": {case.name: measured.calls[case.name] for case in CASES},
        "seconds": seconds,
        "wrong": concurrent["wrong"],
        "exceptions": concurrent["exceptions"],
    }
    figures["round_trips"] = {
        operation: {name: round_trips(figures, operation, name) for name in CONTENDERS}
        for operation in seconds
    }
    return figures


def added_round_trip(figures: Mapping[str, Any]) -> float:
    """What the latency added to a bare round trip, in seconds: the unit of round trips."""
    bare = figures["bare_round_trip"]
    return bare["far"] - bare["near"]


def round_trips(figures: Mapping[str, Any], operation: str, name: str) -> list[float]:
    """Per round, what the latency added to one call, in round trips."""
    seconds = figures["seconds"][operation]
    unit = added_round_trip(figures)
    return [
        (far - near) / unit for far, near in zip(seconds[name], seconds[name + NEAR], strict=True)
    ]


def cell(figures: Mapping[str, Any], operation: str, name: str) -> str:
    """Round trips, and the median time of one call with the latency."""
    trips = statistics.median(figures["round_trips"][operation][name])
    return f"{trips:,.1f} ({statistics.median(figures['seconds'][operation][name]) * 1e3:,.2f} ms)"


def rows(figures: Mapping[str, Any]) -> list[list[str]]:
    return [
        [operation, *(cell(figures, operation, name) for name in CONTENDERS)]
        for operation in figures["seconds"]
    ]


def header() -> list[str]:
    return ["operation", *(LABELS[name] for name in CONTENDERS)]


def round_trip_line(figures: Mapping[str, Any]) -> str:
    bare = figures["bare_round_trip"]
    return (
        f"A bare round trip took {bare['far'] * 1e6:,.0f} µs with "
        f"{figures['latency'] * 1e6:,.0f} µs added and {bare['near'] * 1e6:,.0f} µs without, "
        f"so one round trip here adds {added_round_trip(figures) * 1e6:,.0f} µs."
    )


def failures_line(figures: Mapping[str, Any]) -> str:
    failed = {
        LABELS[name]: figures["wrong"].get(name, 0) + sum(figures["exceptions"][name].values())
        for name in CONTENDERS
    }
    listed = ", ".join(f"{label} {count}" for label, count in failed.items())
    return f"Concurrent requests with latency that got a wrong value or an exception: {listed}."


def section(figures: Mapping[str, Any]) -> Section:
    return Section(
        f"Over a network: {figures['latency'] * 1e6:,.0f} µs added to every round trip",
        [
            Paragraph(
                "``benchmarks/network.py``: a 3-node ``LocalCluster(latency=...)``, whose "
                "relay holds every reply that long, as a VPC's network would (same-AZ round "
                "trips take a few hundred µs, loopback's about 25), against a twin cluster "
                "without latency in the same interleaved rounds "
                f"({figures['rounds']}). A cell is what the latency added to one call, in "
                "round trips (one after another), and the median time of the call with the "
                "latency; the concurrent row is a whole wave."
            ),
            Table.of(header(), rows(figures)),
            Notes([round_trip_line(figures), failures_line(figures), DISCOVERY_NOTE]),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY, help="seconds added")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--target", type=float, default=TARGET_SECONDS, help="s a measurement")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.latency)
        return 0
    if not args.latency > 0:
        parser.error(f"--latency must be above 0 seconds, got {args.latency}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.getLogger("django_elasticache").setLevel(logging.ERROR)
    figures = run(args.latency, args.rounds, args.target)
    print(Table.of(header(), rows(figures)).text())
    print(round_trip_line(figures))
    print(failures_line(figures))
    print(DISCOVERY_NOTE)
    print()
    print(target_table(network_targets(figures)).text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
