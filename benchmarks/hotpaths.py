"""
The hot paths beside their floors: pipelined set_many, get_many, TLS set_many, a mixed
workload and single-key calls, each against raw clients on the same local nodes.

Run alone: ``python benchmarks/hotpaths.py [--rounds 7] [--calls 200]``. Every round times
each contender for ``calls`` calls in turn (interleaved, so load on the machine hits all
alike); the figure is the median over rounds, in microseconds per call. The clusters are
``LocalCluster``s of three nodes, clear text and TLS.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pylibmc
from backends import (
    DJANGO_KEY_PREFIX,
    DJANGO_TIMEOUT,
    build_elastipymemcache,
    build_ours,
    build_ours_pymemcache,
    our_behaviors,
)

from django_elasticache.testing import LocalCluster

KEYS = [f"hot-{index}" for index in range(100)]
VALUE = "v" * 100
DATA = dict.fromkeys(KEYS, VALUE)
READY_KEYS = [DJANGO_KEY_PREFIX + key for key in KEYS]
READY_DATA = dict.fromkeys(READY_KEYS, VALUE)

Call = Callable[[], Any]


def raw_client(cluster: LocalCluster, **behaviors: Any) -> pylibmc.Client:
    """pylibmc over every node at once, with our behaviours (plus ``behaviors``)."""
    return pylibmc.Client(cluster.node_addresses, behaviors={**our_behaviors(), **behaviors})


def mixed(cache_set: Call, cache_get: Call, cache_get_many: Call) -> Call:
    def run() -> None:
        cache_set()
        cache_get()
        cache_get_many()

    return run


def comparisons(clear: LocalCluster, tls: LocalCluster) -> dict[str, dict[str, Call]]:
    """Each comparison's contenders, the first being ours."""
    ours = build_ours(clear, {})
    raw = raw_client(clear)
    raw_noreply = raw_client(clear, _noreply=True)
    ours_tls = build_ours_pymemcache(tls, {})
    ours_clear_pymemcache = build_ours_pymemcache(clear, {})
    elastipymemcache_tls = build_elastipymemcache(tls, {})
    for cache in (ours, ours_tls, elastipymemcache_tls):
        cache.set_many(DATA)
    raw.set_multi(READY_DATA, time=DJANGO_TIMEOUT)
    twenty, ready_twenty = KEYS[:20], READY_KEYS[:20]
    raw_set = functools.partial(raw.set, READY_KEYS[0], VALUE, DJANGO_TIMEOUT)
    return {
        "set_many(100) x 100 B": {
            "ours (pylibmc)": functools.partial(ours.set_many, DATA),
            "raw pylibmc set_multi": functools.partial(raw.set_multi, READY_DATA, DJANGO_TIMEOUT),
            "raw pylibmc _noreply": functools.partial(
                raw_noreply.set_multi, READY_DATA, DJANGO_TIMEOUT
            ),
        },
        "get_many(100)": {
            "ours (pylibmc)": functools.partial(ours.get_many, KEYS),
            "raw pylibmc get_multi, ready keys": functools.partial(raw.get_multi, READY_KEYS),
        },
        "TLS set_many(100) x 100 B": {
            "ours (pymemcache), TLS": functools.partial(ours_tls.set_many, DATA),
            "ours (pymemcache), clear text": functools.partial(
                ours_clear_pymemcache.set_many, DATA
            ),
            "django-elastipymemcache, TLS": functools.partial(elastipymemcache_tls.set_many, DATA),
        },
        "mixed: set + get + get_many(20)": {
            "ours (pylibmc)": mixed(
                functools.partial(ours.set, KEYS[0], VALUE),
                functools.partial(ours.get, KEYS[1]),
                functools.partial(ours.get_many, twenty),
            ),
            "raw pylibmc": mixed(
                raw_set,
                functools.partial(raw.get, READY_KEYS[1]),
                functools.partial(raw.get_multi, ready_twenty),
            ),
        },
        "single get": {
            "ours (pylibmc)": functools.partial(ours.get, KEYS[1]),
            "raw pylibmc": functools.partial(raw.get, READY_KEYS[1]),
        },
        "single set": {
            "ours (pylibmc)": functools.partial(ours.set, KEYS[0], VALUE),
            "raw pylibmc": raw_set,
        },
    }


def per_call_us(call: Call, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def measure(
    contenders: dict[str, dict[str, Call]], rounds: int, calls: int
) -> dict[str, dict[str, float]]:
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for comparison, calls_by_name in contenders.items():
            for name, call in calls_by_name.items():
                samples.setdefault((comparison, name), []).append(per_call_us(call, calls))
    medians: dict[str, dict[str, float]] = {}
    for (comparison, name), times in samples.items():
        medians.setdefault(comparison, {})[name] = statistics.median(times)
    return medians


def report(medians: dict[str, dict[str, float]]) -> None:
    for comparison, by_name in medians.items():
        print(comparison)
        ours_name, ours = next(iter(by_name.items()))
        for name, value in by_name.items():
            ratio = "" if name == ours_name else f"   time ours/this {ours / value:.2f}"
            print(f"  {name:38} {value:9.1f} us{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    arguments = parser.parse_args()
    with LocalCluster(relay=False) as clear, LocalCluster(tls=True, relay=False) as tls:
        contenders = comparisons(clear, tls)
        measure(contenders, 1, 20)  # Connections opened, code paths warmed.
        report(measure(contenders, arguments.rounds, arguments.calls))


if __name__ == "__main__":
    main()
