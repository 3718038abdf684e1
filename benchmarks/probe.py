"""
What one contender costs a fresh process: time to the first answer, and memory.

Run by ``run.py`` in a new interpreter per measurement, because both costs exist once per
process: the first ``get`` of a process opens the connections and, for the discovering
backends, asks the configuration endpoint for the nodes first. The child prints one JSON
object; the parent runs the contenders in turn, rounds interleaved, and takes medians.

With ``connections`` the child times the connections of a pymemcache-based backend one by
one instead, for the cost of TLS: discovery alone (the first ``cache._cache``, which asks
the endpoint and builds a client that has not connected yet), the first ``get`` (one
node's connection), then the first ``get_many`` of keys on every node (the other nodes'
connections), each next to the same call made again warm.

Child usage (internal): ``python benchmarks/probe.py '{"contender": ..., "location": ...,
"node_addresses": [...], "hosts": {...}, "ca_pem": ..., "behaviors": {...},
"connections": false}'``
"""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SETS = 1000
SET_VALUE_SIZE = 1024
WARM_GETS = 21
WARM_GET_MANYS = 5
SPREAD_KEYS = [f"bench:probe:spread:{i}" for i in range(64)]
"""Keys for a get_many that reaches every node: 64 keys all miss one of 3 nodes with a
chance of 3 * (2/3)**64, about 2e-11."""
CHILD_TIMEOUT = 60.0


def rss_kib() -> int:
    """Resident memory of this process, from the kernel's own account (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def cluster_of(spec: Mapping[str, Any]) -> Any:
    from backends import Addresses

    return Addresses(
        spec["location"], list(spec["node_addresses"]), dict(spec["hosts"]), spec["ca_pem"]
    )


def probe(spec: Mapping[str, Any]) -> dict[str, float]:
    """Import, build, first get, warm gets and 1000 sets of one contender, in this process."""
    from backends import BY_NAME

    if spec.get("connections"):
        return probe_connections(spec)
    contender = BY_NAME[spec["contender"]]
    cluster = cluster_of(spec)
    rss_before = rss_kib()
    start = time.perf_counter()
    importlib.import_module(contender.module)
    imported = time.perf_counter()
    target = contender.build(cluster, spec["behaviors"])
    built = time.perf_counter()
    calls = contender.calls(target)
    key = calls.key("bench:probe")
    calls.get(key)
    first = time.perf_counter()
    warm = []
    for _ in range(WARM_GETS):
        before = time.perf_counter()
        calls.get(key)
        warm.append(time.perf_counter() - before)
    value = b"r" * SET_VALUE_SIZE
    for i in range(SETS):
        calls.set(calls.key(f"bench:probe:{i}"), value)
    return {
        "import_ms": (imported - start) * 1e3,
        "build_ms": (built - imported) * 1e3,
        "first_get_ms": (first - built) * 1e3,
        "warm_get_ms": statistics.median(warm) * 1e3,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_kib(),
    }


def timed(call: Any, *args: Any) -> float:
    """Milliseconds one call takes."""
    start = time.perf_counter()
    call(*args)
    return (time.perf_counter() - start) * 1e3


def probe_connections(spec: Mapping[str, Any]) -> dict[str, float]:
    """Discovery, the first node's connection and the others', each timed on its own."""
    from backends import BY_NAME

    contender = BY_NAME[spec["contender"]]
    importlib.import_module(contender.module)
    start = time.perf_counter()
    cache = contender.build(cluster_of(spec), spec["behaviors"])
    built = time.perf_counter()
    key = "bench:probe"
    result = {
        "build_ms": (built - start) * 1e3,
        "discovery_ms": timed(lambda: cache._cache),
        "first_get_ms": timed(cache.get, key),
        "first_get_many_ms": timed(cache.get_many, SPREAD_KEYS),
    }
    result["warm_get_ms"] = statistics.median(timed(cache.get, key) for _ in range(WARM_GETS))
    result["warm_get_many_ms"] = statistics.median(
        timed(cache.get_many, SPREAD_KEYS) for _ in range(WARM_GET_MANYS)
    )
    result["rss_after_kib"] = rss_kib()
    return result


def run_child(spec: Mapping[str, Any]) -> dict[str, float]:
    """Run ``probe`` in a new interpreter and return what it printed."""
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"probe of {spec['contender']} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def probe_all(
    clusters: Mapping[str, Any],
    behaviors: Mapping[str, Any],
    rounds: int,
    connections: bool = False,
) -> dict[str, dict[str, list[float]]]:
    """
    Every metric of every contender, each on its cluster (``backends.Addresses``), one
    value per round, contenders rotated per round.
    """
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in clusters}
    order = list(clusters)
    for round_index in range(rounds):
        rotation = round_index % len(order)
        for name in order[rotation:] + order[:rotation]:
            spec = {
                "contender": name,
                **clusters[name].spec(),
                "behaviors": dict(behaviors),
                "connections": connections,
            }
            for metric, value in run_child(spec).items():
                samples[name].setdefault(metric, []).append(value)
    return samples


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
