"""
The hot paths beside their floors: pipelined set_many, get_many, TLS set_many, a mixed
workload and single-key calls, each against raw clients on the same local nodes.

Run alone: ``python benchmarks/hotpaths.py [--rounds 7] [--calls 200]``; ``run.py`` runs it
too and puts its targets in the pass/fail table. Every round times each contender for
``calls`` calls in turn (interleaved, so load on the machine hits all alike); a time is the
median over rounds, a ratio the median of the per-round ratios. The clusters are
``LocalCluster``s of three nodes, clear text and TLS.

Single-key calls cycle over a hundred keys rather than repeat one. On a small machine a
node answers in 20 to 70 µs over loopback depending on whether its memcached thread and
the client share a CPU, and ours places a key by node hostname where raw pylibmc places it
by address: one repeated key would time whichever node each happened to pick.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pylibmc
from backends import (
    DJANGO_KEY_PREFIX,
    DJANGO_TIMEOUT,
    TIMEOUT_SECONDS,
    build_elastipymemcache,
    build_ours,
    build_ours_pymemcache,
    build_pymemcache,
    build_stock,
    our_behaviors,
)
from stats import paired
from tables import Table
from wire import connect

from django_elasticache import backend, memcached, protocol, pymemcache, routing
from django_elasticache.pipeline import receive
from django_elasticache.protocol import parse_values, parse_values_in_python, retrieval_request
from django_elasticache.testing import LocalCluster

KEYS = [f"hot-{index}" for index in range(100)]
VALUE = "v" * 100
DATA = dict.fromkeys(KEYS, VALUE)
READY_KEYS = [DJANGO_KEY_PREFIX + key for key in KEYS]
READY_DATA = dict.fromkeys(READY_KEYS, VALUE)
MIXED_BATCH = 20

SET_MANY = "set_many(100) x 100 B"
GET_MANY = "get_many(100) x 100 B"
GET_MANY_20 = f"get_many({MIXED_BATCH}) x 100 B"
PYMEMCACHE_GET_MANY = "pymemcache get_many(100) x 100 B"
TLS_SET_MANY = "TLS set_many(100) x 100 B"
MIXED = f"mixed: set + get + get_many({MIXED_BATCH}), 100 B"
PYMEMCACHE_MIXED = f"pymemcache {MIXED}"
TLS_MIXED = f"TLS {MIXED}"
SINGLE_GET = "get 100 B"
SINGLE_SET = "set 100 B"

OURS = "ours (pylibmc)"
OURS_PURE = "ours (pylibmc), pure-Python loops"
STOCK = "stock PyLibMCCache"
RAW = "raw pylibmc"
RAW_SET_MULTI = "raw pylibmc set_multi"
RAW_NOREPLY = "raw pylibmc, _noreply"
RAW_GET_MULTI = "raw pylibmc get_multi, ready keys"
SOCKET_FLOOR = "Python floor: sockets + protocol.parse_values"
OURS_TLS = "ours (pymemcache), TLS"
OURS_CLEAR = "ours (pymemcache), clear text"
OURS_CLEAR_PURE = "ours (pymemcache), clear text, pure-Python loops"
ELASTI_TLS = "django-elastipymemcache, TLS"
STOCK_PYMEMCACHE = "stock PyMemcacheCache"

Call = Callable[[], Any]


def raw_client(cluster: LocalCluster, **behaviors: Any) -> pylibmc.Client:
    """pylibmc over every node at once, with our behaviours (plus ``behaviors``)."""
    return pylibmc.Client(cluster.node_addresses, behaviors={**our_behaviors(), **behaviors})


def socket_floor(cache: Any) -> Call:
    """
    What any Python reader of ``get_many(KEYS)`` costs at least: ``cache``'s request for
    each node, built once, sent on a socket of its own to every node, then every reply read
    and parsed by ``protocol.parse_values``; no keys made, no routing, no values decoded.
    """
    groups = cache._cache.by_pool(READY_KEYS)
    requests = []
    for pool, keys in groups.items():
        sock = connect(pool.node, None, TIMEOUT_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        requests.append((sock, retrieval_request(key.encode() for key in keys)))

    def get_many() -> None:
        for sock, request in requests:
            sock.sendall(request)
        for sock, _ in requests:
            receive(sock, parse_values)

    return get_many


_COMPILED_LOOPS = {
    (memcached, "parse_values"): protocol.parse_values_in_python,
    (pymemcache, "parse_values"): protocol.parse_values_in_python,
    (memcached, "retrieval_request_for"): protocol.retrieval_request_in_python,
    (memcached, "decoded_values"): protocol.decoded_values_in_python,
    (routing, "group_by_node"): routing.group_by_node_in_python,
    (backend, "prefixed_keys"): None,
}
"""Where each module took a compiled loop, and the pure-Python code it takes without."""


def reading_with(reader: Callable[..., Any], call: Call) -> Call:
    """
    ``call`` with the compiled loops (``reader`` is ``parse_values``) or their pure-Python
    twins (``reader`` is ``parse_values_in_python``), side by side in one process (both
    contenders pay the swap).
    """
    pure = reader is parse_values_in_python
    loops = {place: getattr(*place) for place in _COMPILED_LOOPS}

    def run() -> Any:
        if pure:
            for (module, name), fallback in _COMPILED_LOOPS.items():
                setattr(module, name, fallback)
        try:
            return call()
        finally:
            for (module, name), loop in loops.items():
                setattr(module, name, loop)

    return run


def cycling(call: Callable[..., Any], arguments: Sequence[Any]) -> Call:
    """``call`` with each of ``arguments`` in turn, one per call."""
    each = itertools.cycle(arguments)
    return lambda: call(next(each))


def mixed(*steps: Call) -> Call:
    def run() -> None:
        for step in steps:
            step()

    return run


def comparisons(clear: LocalCluster, tls: LocalCluster) -> dict[str, dict[str, Call]]:
    """Each comparison's contenders, the first being ours."""
    ours = build_ours(clear, {})
    stock = build_stock(clear, our_behaviors())
    raw = raw_client(clear)
    raw_noreply = raw_client(clear, _noreply=True)
    ours_tls = build_ours_pymemcache(tls, {})
    ours_clear_pymemcache = build_ours_pymemcache(clear, {})
    elastipymemcache_tls = build_elastipymemcache(tls, {})
    stock_pymemcache = build_pymemcache(clear, {})
    for cache in (ours, ours_tls, elastipymemcache_tls, ours_clear_pymemcache):
        cache.set_many(DATA)
    raw.set_multi(READY_DATA, time=DJANGO_TIMEOUT)
    batches = [KEYS[start : start + MIXED_BATCH] for start in range(0, len(KEYS), MIXED_BATCH)]
    ready_batches = [[DJANGO_KEY_PREFIX + key for key in batch] for batch in batches]

    def mixed_on(cache: Any) -> Call:
        """The mixed workload through a Django cache backend."""
        return mixed(
            cycling(functools.partial(cache.set, value=VALUE), KEYS),
            cycling(cache.get, KEYS),
            cycling(cache.get_many, batches),
        )

    ours_mixed = mixed_on(ours)
    raw_set = cycling(functools.partial(raw.set, val=VALUE, time=DJANGO_TIMEOUT), READY_KEYS)
    return {
        SET_MANY: {
            OURS: functools.partial(ours.set_many, DATA),
            RAW_SET_MULTI: functools.partial(raw.set_multi, READY_DATA, DJANGO_TIMEOUT),
            RAW_NOREPLY: functools.partial(raw_noreply.set_multi, READY_DATA, DJANGO_TIMEOUT),
        },
        GET_MANY: {
            OURS: reading_with(parse_values, functools.partial(ours.get_many, KEYS)),
            OURS_PURE: reading_with(
                parse_values_in_python, functools.partial(ours.get_many, KEYS)
            ),
            RAW_GET_MULTI: functools.partial(raw.get_multi, READY_KEYS),
            STOCK: functools.partial(stock.get_many, KEYS),
            SOCKET_FLOOR: socket_floor(ours),
        },
        GET_MANY_20: {
            OURS: reading_with(parse_values, cycling(ours.get_many, batches)),
            OURS_PURE: reading_with(parse_values_in_python, cycling(ours.get_many, batches)),
            RAW_GET_MULTI: cycling(raw.get_multi, ready_batches),
            STOCK: cycling(stock.get_many, batches),
        },
        PYMEMCACHE_GET_MANY: {
            OURS_CLEAR: reading_with(
                parse_values, functools.partial(ours_clear_pymemcache.get_many, KEYS)
            ),
            OURS_CLEAR_PURE: reading_with(
                parse_values_in_python, functools.partial(ours_clear_pymemcache.get_many, KEYS)
            ),
        },
        TLS_SET_MANY: {
            OURS_TLS: functools.partial(ours_tls.set_many, DATA),
            OURS_CLEAR: functools.partial(ours_clear_pymemcache.set_many, DATA),
            ELASTI_TLS: functools.partial(elastipymemcache_tls.set_many, DATA),
        },
        MIXED: {
            OURS: reading_with(parse_values, ours_mixed),
            OURS_PURE: reading_with(parse_values_in_python, ours_mixed),
            RAW: mixed(
                raw_set, cycling(raw.get, READY_KEYS), cycling(raw.get_multi, ready_batches)
            ),
            STOCK: mixed_on(stock),
        },
        PYMEMCACHE_MIXED: {
            OURS_CLEAR: mixed_on(ours_clear_pymemcache),
            STOCK_PYMEMCACHE: mixed_on(stock_pymemcache),
        },
        TLS_MIXED: {OURS_TLS: mixed_on(ours_tls), ELASTI_TLS: mixed_on(elastipymemcache_tls)},
        SINGLE_GET: {OURS: cycling(ours.get, KEYS), RAW: cycling(raw.get, READY_KEYS)},
        SINGLE_SET: {
            OURS: cycling(functools.partial(ours.set, value=VALUE), KEYS),
            RAW: raw_set,
        },
    }


def seconds_per_call(call: Call, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def measure(
    contenders: dict[str, dict[str, Call]], rounds: int, calls: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of every contender of every comparison, one entry per round."""
    samples: dict[str, dict[str, list[float]]] = {
        comparison: {name: [] for name in calls_by_name}
        for comparison, calls_by_name in contenders.items()
    }
    for _ in range(rounds):
        for comparison, calls_by_name in contenders.items():
            for name, call in calls_by_name.items():
                samples[comparison][name].append(seconds_per_call(call, calls))
    return samples


def run(rounds: int, calls: int) -> dict[str, Any]:
    """Every comparison on fresh clusters: ``{"rounds", "calls", "seconds"}``."""
    with LocalCluster(relay=False) as clear, LocalCluster(tls=True, relay=False) as tls:
        contenders = comparisons(clear, tls)
        measure(contenders, 1, 20)  # Connections opened, code paths warmed.
        seconds = measure(contenders, rounds, calls)
    return {"rounds": rounds, "calls": calls, "seconds": seconds}


def rows(hotpaths: dict[str, Any]) -> list[list[str]]:
    """comparison, contender, median µs per call, and ours' time over the contender's."""
    table = []
    for comparison, by_name in hotpaths["seconds"].items():
        ours = next(iter(by_name))
        for name, seconds in by_name.items():
            ratio = (
                "" if name == ours else f"{statistics.median(paired(by_name, name, ours)):.2f}x"
            )
            table.append([comparison, name, f"{statistics.median(seconds) * 1e6:,.1f}", ratio])
    return table


def floor_line(figures: dict[str, Any]) -> str:
    """How far the Python floor of get_many is from raw pylibmc, and ours from the floor."""
    seconds = figures["seconds"][GET_MANY]
    floor = statistics.median(paired(seconds, RAW_GET_MULTI, SOCKET_FLOOR))
    ours = statistics.median(paired(seconds, SOCKET_FLOOR, OURS))
    return (
        f"get_many(100): the Python floor (each node's request built once and sent on a "
        f"socket of its own, every reply parsed, no keys made, no routing, no values "
        f"decoded) took {floor:.2f}x the time of raw pylibmc's get_multi, and ours "
        f"{ours:.2f}x the time of the floor."
    )


HEADER = ["comparison", "contender", "µs per call", "ours' time / its time"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    arguments = parser.parse_args()
    from targets import hotpath_targets, target_table  # It imports this module's names.

    figures = run(arguments.rounds, arguments.calls)
    print(f"compiled reader built and in use: {protocol.ACCELERATED}")
    print(Table.of(HEADER, rows(figures)).text())
    print()
    print(target_table(hotpath_targets(figures)).text())


if __name__ == "__main__":
    main()
