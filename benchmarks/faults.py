"""
Fault and topology figures on a LocalCluster, for the live-topology section of README.

    python benchmarks/faults.py

Measures the discovery round trip and how long a first request takes to fail on a silent
endpoint; then, each in a bounded load loop of single-key gets and sets:
errors surfaced to the caller while a node is killed (with and without IGNORE_EXCEPTIONS),
the worst operation latency while the configuration endpoint hangs, the time from a config
version bump to the first key stored on the new node, and the share of keys a 4 -> 5 node
scale-out moves. Then the topology's recovery figures: the share of thread-time spent in
cache calls while a process starts against a hung endpoint, the time to follow a cluster
re-created under its name (config version back to 1), and how many workers forked from an
idle pre-fork master end their short life on the node list from before a scale-out.
Last, placement: how many keys of the nodes that stay a node replacement moves, how many
reads return a value from before a rewrite after two replacements, and how many keys deleted
while scaled out come back after scaling in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import django
from django.conf import settings

settings.configure(CACHES={}, USE_TZ=True)
django.setup()


from django_elasticache.cluster_utils import EndpointTimeout, discover  # noqa: E402
from django_elasticache.memcached import ElastiCache  # noqa: E402
from django_elasticache.options import parse_location  # noqa: E402
from django_elasticache.testing import ConfigEndpoint, LocalCluster  # noqa: E402
from django_elasticache.testing.cluster import start_memcached  # noqa: E402

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
            except cache.server_errors:
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


def _follow(cache: ElastiCache, wanted) -> None:
    """Serve probes until the backend's node list satisfies ``wanted`` (10 s at most)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # A node that just left the list errs until the new list is in use.
        with contextlib.suppress(*cache.server_errors):
            cache.get("probe")
        if wanted(cache.client_servers):
            return
        time.sleep(0.02)
    raise RuntimeError("the backend did not follow the node list within 10 s")


def _replace(cluster: LocalCluster, node, ip: str):
    """ElastiCache's replacement: a new, empty node under the same hostname and port, new IP."""
    replacement = start_memcached(ip, node.port, hostname=node.hostname)
    cluster.publish(
        [replacement if other is node else other for other in cluster.nodes],
        cluster.config_version + 1,
    )
    node.stop()
    return replacement


def keys_moved_by_replacement(keys: int = 5000) -> tuple[int, int]:
    """Keys held by the nodes that stay, and how many of them a replacement moved (target 0)."""
    with LocalCluster(nodes=3) as cluster:
        cache = backend(cluster.location, REFRESH_INTERVAL=0.1)
        names = [f"k{index}" for index in range(keys)]
        cache.set_many(dict.fromkeys(names, "value"))
        victim = cluster.nodes[1]
        on_victim = set(_held(victim, [cache.make_key(name) for name in names]))
        kept = [name for name in names if cache.make_key(name) not in on_victim]
        with _replace(cluster, victim, "127.0.0.2") as replacement:
            _follow(cache, lambda servers: replacement.address in servers)
            found = cache.get_many(kept)
        return len(kept) - len(found), len(kept)


def stale_reads_after_replacements(keys: int = 5000) -> int:
    """
    Reads of a value from before a rewrite, after the same node was replaced twice, as
    vertical scaling or repeated failures do (target 0).
    """
    with LocalCluster(nodes=3) as cluster:
        cache = backend(cluster.location, REFRESH_INTERVAL=0.1)
        names = [f"k{index}" for index in range(keys)]
        cache.set_many(dict.fromkeys(names, "before"))
        first = _replace(cluster, cluster.nodes[0], "127.0.0.2")
        with first:
            _follow(cache, lambda servers: first.address in servers)
            cache.set_many(dict.fromkeys(names, "after"))
            second = _replace(cluster, first, "127.0.0.3")
            with second:
                _follow(cache, lambda servers: second.address in servers)
                return sum(value == "before" for value in cache.get_many(names).values())


def resurrected_deletes(keys: int = 300) -> int:
    """Keys deleted while scaled out 3 -> 4 that read back after scaling in (target 0)."""
    with LocalCluster(nodes=3) as cluster:
        cache = backend(cluster.location, REFRESH_INTERVAL=0.1)
        names = [f"k{index}" for index in range(keys)]
        cache.set_many(dict.fromkeys(names, "old"))
        added = cluster.add_node()
        _follow(cache, lambda servers: added.address in servers)
        cache.delete_many(names)
        cluster.remove_node(added)
        _follow(cache, lambda servers: added.address not in servers)
        return len(cache.get_many(names))


def _held(node, names: list[str]) -> list[str]:
    return [name for name in names if node.holds([name])]


def blocked_share_at_hung_start_up(threads: int = 8, seconds: float = 6.0) -> float:
    """
    Share of thread-time spent inside cache calls while ``threads`` threads serve requests
    (one get and 2 ms of other work each) from a cold start against an endpoint that never
    answers; DISCOVERY_TIMEOUT 2 s, IGNORE_EXCEPTIONS so failures are misses.
    """
    with ConfigEndpoint() as endpoint:
        endpoint.misbehave("hang")
        in_calls = [0.0] * threads
        lifetimes = [0.0] * threads
        stop_at = time.monotonic() + seconds

        def serve(index: int) -> None:
            cache = backend(endpoint.location, DISCOVERY_TIMEOUT=2, IGNORE_EXCEPTIONS=True)
            began = time.monotonic()
            while time.monotonic() < stop_at:
                started = time.monotonic()
                cache.get("key")
                in_calls[index] += time.monotonic() - started
                time.sleep(0.002)
            lifetimes[index] = time.monotonic() - began

        workers = [threading.Thread(target=serve, args=(index,)) for index in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return sum(in_calls) / sum(lifetimes)


def recovery_after_recreation() -> float:
    """
    Seconds from a cluster's re-creation (new nodes, config version back from 100 to 1) to
    the backend using the new nodes, under a load of gets and sets with default settings.
    """
    with LocalCluster(nodes=3, config_version=100) as cluster:
        cache = backend(cluster.location, IGNORE_EXCEPTIONS=True)
        cache.set("warm", 1)
        fresh = [start_memcached(hostname=f"recreated.{index}.cache.local") for index in range(3)]
        try:
            for node in cluster.nodes:
                cluster.kill_node(node)
            cluster.publish(fresh, version=1)
            recreated = time.monotonic()
            addresses = sorted(node.address for node in fresh)
            index = 0
            while time.monotonic() < recreated + 120:
                cache.set(f"k{index % KEYS}", index)
                cache.get(f"k{(index + 1) % KEYS}")
                if sorted(cache.client_servers) == addresses:
                    return time.monotonic() - recreated
                index += 1
                time.sleep(0.001)
            raise RuntimeError("the re-created cluster was not followed within 120 s")
        finally:
            for node in fresh:
                node.stop()


def recycled_worker_staleness(workers: int = 20, interval: float = 1.0) -> int:
    """
    Workers, forked one after another more than ``interval`` after a 3 -> 4 scale-out from
    a master that used the cache before it and served nothing since, that still use 3 nodes
    at the last of their 20 requests (10 ms apart), as with --preload and --max-requests.
    """
    with LocalCluster(nodes=3) as cluster:
        cache = backend(cluster.location, REFRESH_INTERVAL=interval)
        cache.get("warm")
        cluster.add_node()
        time.sleep(interval * 1.2)
        stale = 0
        for _ in range(workers):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    for _ in range(20):
                        cache.get("key")
                        time.sleep(0.01)
                    code = 0 if len(cache.client_servers) == 4 else 3
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code not in (0, 3):
                raise RuntimeError(f"a worker failed with exit code {code}")
            stale += code == 3
        return stale


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
    print(
        "share of thread-time blocked at start-up with a hung endpoint (8 threads, "
        f"DISCOVERY_TIMEOUT=2, 6 s): {blocked_share_at_hung_start_up():.1%}"
    )
    print(
        "recovery time after a re-creation (config version 100 -> 1, default settings, "
        f"under load): {recovery_after_recreation():.1f} s"
    )
    print(
        "recycled-worker staleness (REFRESH_INTERVAL=1, workers forked after one interval): "
        f"{recycled_worker_staleness()} of 20 workers ended on the old node list"
    )
    moved, kept = keys_moved_by_replacement()
    print(f"replacing 1 node of 3: {moved} of the {kept} keys of the other nodes moved")
    print(
        "one node replaced twice, every key rewritten in between: "
        f"{stale_reads_after_replacements()} of 5000 reads returned the value from before"
    )
    print(
        "300 keys deleted while scaled out 3 -> 4, read after scaling back in: "
        f"{resurrected_deletes()} came back"
    )


if __name__ == "__main__":
    main()
