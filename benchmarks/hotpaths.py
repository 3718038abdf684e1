"""
The hot paths beside their floors: pipelined set_many, get_many, TLS set_many, a mixed
workload and single-key calls, each against raw clients on the same local nodes.

Run alone: ``python benchmarks/hotpaths.py [--rounds 7] [--calls 200]``; ``run.py`` runs it
too and puts its targets in the pass/fail table. Every round times each contender for
``calls`` calls, the contenders of a comparison taking ``TURNS`` turns (interleaved, so load
on the machine hits all alike); a time is the median over rounds, a ratio the median of the
per-round ratios. The clusters are ``LocalCluster``s of three nodes, clear text and TLS.

Every contender sends each key to the same node. On a small machine a node answers in 20
to 70 µs over loopback depending on whether its memcached thread and the client share a CPU
(one run: 69, 21 and 68 µs for a single-key ``get`` on the three nodes), and ours places a
key by node hostname where raw pylibmc and Django's stock backends place it by address: on
``hot-0`` to ``hot-99`` raw pylibmc put 40 keys on the fast node and ours 32, which alone
made ours 7% slower. So the keys are the first hundred ``hot-<n>`` that both placements put
on the same node (``agreeing_keys``), and single-key calls cycle over them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
from workloads import rotated

from django_elasticache import backend, memcached, protocol, pymemcache, routing
from django_elasticache.pipeline import receive, send
from django_elasticache.protocol import parse_values, retrieval_request
from django_elasticache.testing import LocalCluster

KEY_COUNT = 100
VALUE = "v" * 100
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


def agreeing_keys(ours: Any, raw: pylibmc.Client, cluster: LocalCluster) -> list[str]:
    """
    The first ``KEY_COUNT`` keys ``hot-<n>`` that ours and ``raw`` (over
    ``cluster.node_addresses``, as Django's stock backend too) place on the same node.
    """
    keys = []
    for index in range(100 * KEY_COUNT):
        key = f"hot-{index}"
        made = DJANGO_KEY_PREFIX + key
        if ours._cache.pool_for(made).node.address == cluster.node_addresses[raw.hash(made)]:
            keys.append(key)
            if len(keys) == KEY_COUNT:
                return keys
    raise RuntimeError(f"fewer than {KEY_COUNT} keys are placed alike on {cluster.location}")


def socket_floor(cache: Any, ready_keys: list[str]) -> Call:
    """
    What any Python reader of ``get_many(ready_keys)`` costs at least: ``cache``'s request
    for each node, built once, sent on a socket of its own to every node, then every reply
    read and parsed by ``protocol.parse_values``, the socket calls ``pipeline``'s; no keys
    made, no routing, no values decoded.
    """
    groups = cache._cache.by_pool(ready_keys)
    requests = []
    for pool, keys in groups.items():
        sock = connect(pool.node, None, TIMEOUT_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        requests.append((sock, retrieval_request(key.encode() for key in keys)))

    def get_many() -> None:
        for sock, request in requests:
            send(sock, [request])
        for sock, _ in requests:
            receive(sock, parse_values)

    return get_many


_COMPILED_LOOPS = {
    (memcached, "parse_values"): protocol.parse_values_in_python,
    (pymemcache, "parse_values"): protocol.parse_values_in_python,
    (memcached, "retrieval_request_for"): protocol.retrieval_request_in_python,
    (memcached, "decoded_values"): protocol.decoded_values_in_python,
    (routing, "group_by_node"): routing.group_by_node_in_python,
    (routing, "pooled_call"): routing.pooled_call_in_python,
    (backend, "prefixed_keys"): None,
    (backend, "made_key"): backend.made_key_in_python,
}
"""Where each module took a compiled loop, and the pure-Python code it takes without."""


@dataclasses.dataclass
class PureLoops:
    """
    A call made with the pure-Python loops in place of the compiled ones, as where the
    extension is not built: ``measure`` puts them in place around each of its turns,
    outside the time taken. A call with single-key calls needs a cache of its own, first
    called here: a cluster client takes its ``routing.pooled_call`` when it is built.
    """

    call: Call

    def __call__(self) -> Any:
        return self.call()

    @contextlib.contextmanager
    def in_place(self) -> Iterator[None]:
        compiled = {place: getattr(*place) for place in _COMPILED_LOOPS}
        for (module, name), fallback in _COMPILED_LOOPS.items():
            setattr(module, name, fallback)
        try:
            yield
        finally:
            for (module, name), loop in compiled.items():
                setattr(module, name, loop)


class _OwnClients(memcached.ElastiCache):
    """Our pylibmc backend, with clients of its own: they are keyed by the backend class."""


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
    keys = agreeing_keys(ours, raw, clear)
    data = dict.fromkeys(keys, VALUE)
    ready_keys = [DJANGO_KEY_PREFIX + key for key in keys]
    ready_data = dict.fromkeys(ready_keys, VALUE)
    for cache in (ours, ours_tls, elastipymemcache_tls, ours_clear_pymemcache):
        cache.set_many(data)
    raw.set_multi(ready_data, time=DJANGO_TIMEOUT)
    batches = [keys[start : start + MIXED_BATCH] for start in range(0, len(keys), MIXED_BATCH)]
    ready_batches = [[DJANGO_KEY_PREFIX + key for key in batch] for batch in batches]

    def mixed_on(cache: Any) -> Call:
        """The mixed workload through a Django cache backend."""
        return mixed(
            cycling(functools.partial(cache.set, value=VALUE), keys),
            cycling(cache.get, keys),
            cycling(cache.get_many, batches),
        )

    ours_pure = _OwnClients(clear.location, {})
    raw_set = cycling(functools.partial(raw.set, val=VALUE, time=DJANGO_TIMEOUT), ready_keys)
    return {
        SET_MANY: {
            OURS: functools.partial(ours.set_many, data),
            RAW_SET_MULTI: functools.partial(raw.set_multi, ready_data, DJANGO_TIMEOUT),
            RAW_NOREPLY: functools.partial(raw_noreply.set_multi, ready_data, DJANGO_TIMEOUT),
        },
        GET_MANY: {
            OURS: functools.partial(ours.get_many, keys),
            OURS_PURE: PureLoops(functools.partial(ours_pure.get_many, keys)),
            RAW_GET_MULTI: functools.partial(raw.get_multi, ready_keys),
            STOCK: functools.partial(stock.get_many, keys),
            SOCKET_FLOOR: socket_floor(ours, ready_keys),
        },
        GET_MANY_20: {
            OURS: cycling(ours.get_many, batches),
            OURS_PURE: PureLoops(cycling(ours_pure.get_many, batches)),
            RAW_GET_MULTI: cycling(raw.get_multi, ready_batches),
            STOCK: cycling(stock.get_many, batches),
        },
        PYMEMCACHE_GET_MANY: {
            OURS_CLEAR: functools.partial(ours_clear_pymemcache.get_many, keys),
            OURS_CLEAR_PURE: PureLoops(functools.partial(ours_clear_pymemcache.get_many, keys)),
        },
        TLS_SET_MANY: {
            OURS_TLS: functools.partial(ours_tls.set_many, data),
            OURS_CLEAR: functools.partial(ours_clear_pymemcache.set_many, data),
            ELASTI_TLS: functools.partial(elastipymemcache_tls.set_many, data),
        },
        MIXED: {
            OURS: mixed_on(ours),
            OURS_PURE: PureLoops(mixed_on(ours_pure)),
            RAW: mixed(
                raw_set, cycling(raw.get, ready_keys), cycling(raw.get_multi, ready_batches)
            ),
            STOCK: mixed_on(stock),
        },
        PYMEMCACHE_MIXED: {
            OURS_CLEAR: mixed_on(ours_clear_pymemcache),
            STOCK_PYMEMCACHE: mixed_on(stock_pymemcache),
        },
        TLS_MIXED: {OURS_TLS: mixed_on(ours_tls), ELASTI_TLS: mixed_on(elastipymemcache_tls)},
        SINGLE_GET: {OURS: cycling(ours.get, keys), RAW: cycling(raw.get, ready_keys)},
        SINGLE_SET: {
            OURS: cycling(functools.partial(ours.set, value=VALUE), keys),
            RAW: raw_set,
        },
    }


TURNS = 10
"""
Each contender makes its calls of a round in this many turns, the contenders of a comparison
taking turns: a node's answer time drifts within milliseconds on a small machine, and turns
put every contender under the same drift. Who goes first changes from turn to turn: the
first calls after another contender's run on what that one left in the caches, and in a
fixed order the same code on both sides of ``before_after.py`` came out up to 6% slower in
first place than in second.
"""


def seconds_for(call: Call, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return time.perf_counter() - started


def measure(
    contenders: dict[str, dict[str, Call]], rounds: int, calls: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of every contender of every comparison, one entry per round."""
    samples: dict[str, dict[str, list[float]]] = {
        comparison: {name: [] for name in calls_by_name}
        for comparison, calls_by_name in contenders.items()
    }
    calls_per_turn = max(calls // TURNS, 1)
    for _ in range(rounds):
        for comparison, calls_by_name in contenders.items():
            elapsed = dict.fromkeys(calls_by_name, 0.0)
            for turn in range(TURNS):
                for name in rotated(list(calls_by_name), turn):
                    call = calls_by_name[name]
                    pure = isinstance(call, PureLoops)
                    with call.in_place() if pure else contextlib.nullcontext():
                        elapsed[name] += seconds_for(call, calls_per_turn)
            for name, seconds in elapsed.items():
                samples[comparison][name].append(seconds / (calls_per_turn * TURNS))
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
