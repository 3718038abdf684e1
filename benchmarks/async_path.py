"""
The async cache methods against the sync ones, and against Django's stock async path.

Two figures, on a 3-node LocalCluster, in one process:

* latency: ``aget`` awaited one after another against ``get`` called one after another, for
  each backend, and Django's default ``BaseCache.aget`` (a thread hop to ``get``) as it was
  before; median over rounds, rounds interleaved so machine noise hits all alike;
* concurrency: 50 ASGI-style requests at once, each in its own
  ``asgiref.sync.ThreadSensitiveContext`` with its own backend instance (as Django's
  ``caches`` gives each request), each awaiting ``aget`` ``CALLS_PER_REQUEST`` times;
  throughput in agets per second for our backends and Django's ``PyLibMCCache`` over the
  same nodes (its ``aget`` is ``sync_to_async`` around ``get``).

Run: ``python -m benchmarks.async_path`` (add ``--rounds N``; ``--uvloop`` runs the async
parts on uvloop, as uvicorn does when it is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import django
from django.conf import settings

CALLS = 2000
"""Calls per latency round."""
REQUESTS = 50
CALLS_PER_REQUEST = 20
KEY = "bench:user:12345:profile"
VALUE = b"v" * 100


def configure() -> None:
    if not settings.configured:
        settings.configure(CACHES={}, INSTALLED_APPS=[], USE_TZ=True)
        django.setup()


def sync_latency(cache: Any) -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        cache.get(KEY)
    return (time.perf_counter() - started) / CALLS


async def async_latency(aget: Callable[[str], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        await aget(KEY)
    return (time.perf_counter() - started) / CALLS


async def concurrent_throughput(make_cache: Callable[[], Any]) -> float:
    from asgiref.sync import ThreadSensitiveContext

    async def request() -> None:
        async with ThreadSensitiveContext():
            cache = make_cache()
            for _ in range(CALLS_PER_REQUEST):
                if await cache.aget(KEY) != VALUE:
                    raise AssertionError("wrong value")

    started = time.perf_counter()
    await asyncio.gather(*(request() for _ in range(REQUESTS)))
    return REQUESTS * CALLS_PER_REQUEST / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--uvloop", action="store_true")
    arguments = parser.parse_args()
    rounds = arguments.rounds
    run: Callable[..., Any] = asyncio.run
    if arguments.uvloop:
        import uvloop

        run = uvloop.run
    configure()
    from django.core.cache.backends.base import BaseCache
    from django.core.cache.backends.memcached import PyLibMCCache

    from django_elasticache import memcached, pymemcache
    from django_elasticache.testing import LocalCluster

    with LocalCluster(nodes=3, relay=False) as cluster:
        ours = {
            "pylibmc": lambda: memcached.ElastiCache(cluster.location, {}),
            "pymemcache": lambda: pymemcache.ElastiCache(cluster.location, {}),
        }
        stock = {"stock PyLibMCCache": lambda: PyLibMCCache(cluster.node_addresses, {})}
        for make in {**ours, **stock}.values():
            make().set(KEY, VALUE)  # Stock places keys by IP: its own copy.

        latency: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, make in ours.items():
                cache = make()
                latency.setdefault(f"{name} get", []).append(sync_latency(cache))
                aget = run(async_latency(cache.aget))
                latency.setdefault(f"{name} aget", []).append(aget)
                hop = run(async_latency(lambda key, cache=cache: BaseCache.aget(cache, key)))
                latency.setdefault(f"{name} hop", []).append(hop)
        print(f"Latency, one call after another, median of {rounds} rounds of {CALLS}:")
        for name in ours:
            get = statistics.median(latency[f"{name} get"]) * 1e6
            aget = statistics.median(latency[f"{name} aget"]) * 1e6
            hop = statistics.median(latency[f"{name} hop"]) * 1e6
            print(
                f"  {name:10} get {get:6.1f} us   aget {aget:6.1f} us ({aget / get:.2f}x)   "
                f"thread-hop aget {hop:6.1f} us ({hop / get:.2f}x)"
            )

        throughput: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, make in {**ours, **stock}.items():
                rate = run(concurrent_throughput(make))
                throughput.setdefault(name, []).append(rate)
        print(
            f"{REQUESTS} concurrent requests x {CALLS_PER_REQUEST} aget, "
            f"median of {rounds} rounds (agets/s):"
        )
        baseline = statistics.median(throughput["stock PyLibMCCache"])
        for name, rates in throughput.items():
            rate = statistics.median(rates)
            print(f"  {name:18} {rate:9.0f}   ({rate / baseline:.1f}x stock)")


if __name__ == "__main__":
    main()
