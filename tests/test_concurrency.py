"""
One backend instance used from many threads and request contexts at once, and connections
that outlive requests: the deployment shapes of WSGI thread pools and ASGI servers, on real
memcached.

Django keeps backend instances in a context variable, so an instance made before an ASGI
server starts, or carried by a copied context into another thread, is shared. Before the
process-wide pool, pylibmc aborted the process here and pymemcache returned other keys' values.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.cache import caches, close_caches
from django.test import override_settings
from support import node_stats

from django_elasticache.options import BackendOptions
from django_elasticache.testing import LocalCluster

THREADS = 32
ROUNDS = 60
POOL_SIZE = BackendOptions().pool_size
ASGI_CONCURRENCY = 50


def total_connections(cluster: LocalCluster) -> int:
    """Connections every node has accepted since it started, from memcached's own stats."""
    return sum(int(node_stats(node)["total_connections"]) for node in cluster.nodes)


def run_threads(worker, count: int) -> list[BaseException]:
    """Run worker(index) in ``count`` threads at once; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(index: int) -> None:
        start.wait()
        try:
            worker(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    return errors


def test_one_instance_shared_by_many_threads(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)
    wrong: list[tuple[str, object]] = []

    def worker(index: int) -> None:
        for round_ in range(ROUNDS):
            key, value = f"t{index}-{round_ % 7}", (index, round_)
            cache.set(key, value)
            if (found := cache.get(key)) != value:
                wrong.append((key, found))
            many = cache.get_many([key, f"t{index}-missing"])
            if many != {key: value}:
                wrong.append((key, many))

    assert run_threads(worker, THREADS) == []
    assert wrong == []


def test_a_call_made_with_a_client_of_the_node_in_hand_gets_another(
    elasticache_cluster, make_cache
) -> None:
    """
    Code run with a node's client in hand (``cache._cache.on_every_node``, as monitoring
    tools do) may call the cache on that very node: the call gets a second client, and the
    one in hand stays open and in step, and is pooled again.
    """
    cache = make_cache(elasticache_cluster.location)
    values = {f"key-{index}": index for index in range(30)}
    cache.set_many(values)
    seen = cache._cache.on_every_node(
        lambda client: (cache.get_many(list(values)), cache.get("key-0"), cache.set("new", 1))
    )
    assert [found for _, found in seen] == [(values, 0, None)] * 3
    pools = cache._cache.pools
    assert [pool.open_count for pool in pools] == [2, 2, 2]
    assert [len(pool._idle) for pool in pools] == [2, 2, 2]  # every client given back
    seen = cache._cache.on_every_node(lambda client: cache.get_many(list(values)))
    assert [found for _, found in seen] == [values] * 3  # both clients of each node in step
    assert cache.get("new") == 1
    assert [pool.open_count for pool in pools] == [2, 2, 2]


def test_instance_made_at_start_up_serves_concurrent_asgi_requests(
    elasticache_cluster, make_cache
) -> None:
    cache = make_cache(elasticache_cluster.location)
    cache.set("warm-up", 1)  # as an AppConfig.ready() would, before the server starts

    async def request(index: int) -> object:
        # Django's ASGI handler runs each request's sync code in a context of its own, on a
        # thread of its own; the instance made above comes along in every one of them.
        async with ThreadSensitiveContext():
            await sync_to_async(cache.set)(f"r{index}", index)
            await cache.aset(f"a{index}", index)
            return (await sync_to_async(cache.get)(f"r{index}"), await cache.aget(f"a{index}"))

    async def serve() -> list[object]:
        return await asyncio.gather(*(request(index) for index in range(50)))

    assert asyncio.run(serve()) == [(index, index) for index in range(50)]


@contextlib.contextmanager
def django_cache(backend: str, location: str) -> Iterator[None]:
    with override_settings(CACHES={"default": {"BACKEND": backend, "LOCATION": location}}):
        yield


BACKEND_PATHS = {
    "pylibmc": "django_elasticache.memcached.ElastiCache",
    "pymemcache": "django_elasticache.pymemcache.ElastiCache",
}


@pytest.mark.parametrize("backend", sorted(BACKEND_PATHS))
@pytest.mark.parametrize("style", ["wsgi-threads", "asgi-contexts"])
def test_requests_reuse_connections_after_warm_up(elasticache_cluster, backend, style) -> None:
    """
    Each request uses the cache and ends with close_caches(), as Django's request_finished
    does; after warm-up, 400 requests open no connection per request.
    """

    def one_request(index: int) -> None:
        cache = caches["default"]
        for probe in range(5):
            cache.get(f"page-{index}-{probe}")
        cache.set(f"seen-{index}", index)
        close_caches()

    def serve(requests: int) -> None:
        if style == "wsgi-threads":
            per_thread = requests // 8
            errors = run_threads(
                lambda thread: [one_request(thread * per_thread + i) for i in range(per_thread)],
                8,
            )
            assert errors == []
        else:

            async def request(index: int, in_flight: asyncio.Semaphore) -> None:
                async with in_flight, ThreadSensitiveContext():
                    await sync_to_async(one_request)(index)

            async def all_requests() -> None:
                # Each context runs its sync code on a thread of its own: 50 at a time, as a
                # server's concurrency bounds them, not 400 threads on 2 cores.
                in_flight = asyncio.Semaphore(ASGI_CONCURRENCY)
                await asyncio.gather(*(request(index, in_flight) for index in range(requests)))

            asyncio.run(all_requests())

    with django_cache(BACKEND_PATHS[backend], elasticache_cluster.location):
        serve(80)  # warm-up
        before = total_connections(elasticache_cluster)
        serve(400)
        opened = total_connections(elasticache_cluster) - before
    # Each node's pool may grow to its bound once; without pooling each
    # request reconnected (pymemcache: one connection per node per request).
    assert opened <= POOL_SIZE * len(elasticache_cluster.nodes), opened
