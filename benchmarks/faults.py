"""
Fault and topology figures on a LocalCluster, for the live-topology section of README.

    python benchmarks/faults.py

Measures the discovery round trip and how long a first request takes to fail on a silent
endpoint; then, each in a bounded load loop of single-key gets and sets:
errors surfaced to the caller while a node is killed (with and without IGNORE_EXCEPTIONS),
the worst operation latency while the configuration endpoint hangs, the time from a config
version bump to the first key stored on the new node, and the share of keys a 4 -> 5 node
scale-out moves.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time

import django
from django.conf import settings

settings.configure(CACHES={}, USE_TZ=True)
django.setup()

import pylibmc  # noqa: E402

from django_elasticache.cluster_utils import EndpointTimeout, discover  # noqa: E402
from django_elasticache.memcached import ElastiCache  # noqa: E402
from django_elasticache.options import parse_location  # noqa: E402
from django_elasticache.testing import LocalCluster  # noqa: E402

OPERATIONS = 3000
KEYS = 500


def backend(location: str, **options) -> ElastiCache:
    return ElastiCache(location, {"OPTIONS": options})


def discovery_round_trip(runs: int = 200) -> tuple[float, float]:
    """
    Median and 90th percentile seconds of one discovery. The cluster runs in another
    process, as a real endpoint would, so its threads do not share this one's interpreter.
    """
    command = [sys.executable, "-m", "django_elasticache", "local-cluster", "--nodes", "3"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as cluster:
        assert cluster.stdout is not None  # stdout=PIPE
        try:
            endpoint = parse_location(cluster.stdout.readline().split()[-1])
            timings = []
            for _ in range(runs):
                started = time.perf_counter()
                discover(endpoint.host, endpoint.port)
                timings.append(time.perf_counter() - started)
        finally:
            cluster.send_signal(signal.SIGINT)
            cluster.wait(timeout=30)
    timings.sort()
    return statistics.median(timings), timings[int(len(timings) * 0.9)]


def time_to_fail_on_silent_endpoint(timeout: float) -> float:
    """Seconds from a backend's first request to its error when the endpoint never answers."""
    with LocalCluster(nodes=1) as cluster:
        cluster.endpoint.misbehave("hang")
        cache = backend(cluster.location, DISCOVERY_TIMEOUT=timeout)
        started = time.monotonic()
        try:
            cache.get("key")
        except EndpointTimeout:
            return time.monotonic() - started
        raise RuntimeError("a silent endpoint did not time out")


def errors_while_node_killed(ignore_exceptions: bool) -> tuple[int, int, float]:
    """Operations that raised, operations run, and the slowest one, with one node of 3 down."""
    with LocalCluster(nodes=3) as cluster:
        cache = backend(cluster.location, IGNORE_EXCEPTIONS=ignore_exceptions)
        cache.set_many({f"k{index}": index for index in range(KEYS)})
        cluster.kill_node(cluster.nodes[0])
        errors, worst = 0, 0.0
        for index in range(OPERATIONS):
            started = time.perf_counter()
            try:
                if index % 2:
                    cache.set(f"k{index % KEYS}", index)
                else:
                    cache.get(f"k{index % KEYS}")
            except pylibmc.Error:
                errors += 1
            worst = max(worst, time.perf_counter() - started)
        return errors, OPERATIONS, worst


def worst_latency_while_endpoint_hangs() -> tuple[float, float, int]:
    """Slowest and median get while every refresh hangs for the full discovery timeout."""
    with LocalCluster(nodes=3) as cluster:
        cache = backend(cluster.location, REFRESH_INTERVAL=0.2, DISCOVERY_TIMEOUT=2)
        cache.set("key", "value")
        cluster.endpoint.misbehave("hang")
        timings: list[float] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(timings) < 200_000:
            started = time.perf_counter()
            cache.get("key")
            timings.append(time.perf_counter() - started)
        attempts = cluster.endpoint.requests.count("version")
        cluster.endpoint.behave()
        return max(timings), statistics.median(timings), attempts


def time_to_first_key_on_new_node(refresh_interval: float) -> float:
    """Seconds from publishing a new node to the first set that lands on it."""
    with LocalCluster(nodes=3) as cluster:
        cache = backend(cluster.location, REFRESH_INTERVAL=refresh_interval)
        cache.get("warm")
        added = cluster.add_node()
        published = time.monotonic()
        deadline = published + 10 * refresh_interval + 5
        index = 0
        while time.monotonic() < deadline:
            key = f"new-{index}"
            cache.set(key, index)
            if added.holds([cache.make_key(key)]):
                return time.monotonic() - published
            index += 1
        raise RuntimeError("the new node never received a key")


def share_of_keys_moved(keys: int = 5000) -> float:
    """Share of keys whose node changes when a 4-node cluster becomes 5 (ketama)."""
    with LocalCluster(nodes=4) as cluster:
        cache = backend(cluster.location, REFRESH_INTERVAL=0.1)
        names = [cache.make_key(f"k{index}") for index in range(keys)]
        cache._cache.set_multi(dict.fromkeys(names, 1))
        before = {node.address: node.holds(names) for node in cluster.nodes}
        per_node_before = {node.address: set(_held(node, names)) for node in cluster.nodes}
        cluster.add_node()
        deadline = time.monotonic() + 10
        while len(cache.client_servers) < 5 and time.monotonic() < deadline:
            cache.get("probe")
            time.sleep(0.05)
        cache.get("probe")
        cache.clear()
        cache._cache.set_multi(dict.fromkeys(names, 1))
        moved = sum(
            len(per_node_before[address] - set(_held(node, names)))
            for node in cluster.nodes
            for address in [node.address]
            if address in before
        )
        return moved / keys


def _held(node, names: list[str]) -> list[str]:
    return [name for name in names if node.holds([name])]


def main() -> None:
    median, p90 = discovery_round_trip()
    print(
        f"discovery round trip (3 nodes, loopback): median {median * 1e3:.2f} ms, "
        f"90th percentile {p90 * 1e3:.2f} ms over 200 runs"
    )
    for timeout in (0.5, 2.0):
        elapsed = time_to_fail_on_silent_endpoint(timeout)
        print(
            f"silent endpoint, DISCOVERY_TIMEOUT={timeout:g}: first request failed after "
            f"{elapsed:.3f} s"
        )
    for ignore in (False, True):
        errors, total, worst = errors_while_node_killed(ignore)
        print(
            f"node killed, IGNORE_EXCEPTIONS={ignore}: {errors} of {total} operations raised, "
            f"slowest {worst * 1000:.1f} ms"
        )
    worst, median, attempts = worst_latency_while_endpoint_hangs()
    print(
        f"endpoint hanging for 5 s ({attempts} refresh attempts): slowest get "
        f"{worst * 1000:.2f} ms, median {median * 1e6:.0f} us"
    )
    for interval in (1.0, 5.0):
        delays = [time_to_first_key_on_new_node(interval) for _ in range(3)]
        print(
            f"REFRESH_INTERVAL={interval:g}: first key on a new node after "
            f"{statistics.median(delays):.2f} s (median of 3)"
        )
    print(f"4 -> 5 nodes moved {share_of_keys_moved():.1%} of keys (ideal 20%)")


if __name__ == "__main__":
    main()
