"""
The async path interrupted the way production interrupts it: a node that fails while its
siblings are mid-batch, a caller cancelled or timed out by ``wait_for``, a stalled node.
What a user sees must not depend on work left running after a call returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import weakref
from typing import Any

import pytest
from support import eventually, stopped, timeout_rules
from test_async_backend import key_routed_to, open_connections

from django_elasticache.async_client import loop_connections

# Enough keys that the healthy node's part is still being written when the dead node's part
# fails: over TLS one request per round trip, in clear text several pipeline-depth chunks.
BATCH_KEYS = {"tls": 300, "clear": 3000}
SETTLE = 0.3
"""Seconds the loop runs on after a call, for writes a call left behind to land."""


def keys_for(cache: Any, node: Any, count: int, tag: str) -> list[str]:
    keys = (f"{tag}:{index}" for index in range(count * 10))
    on_node = [k for k in keys if cache._cache.pool_for(cache.make_key(k)).node.port == node.port]
    return on_node[:count]


@pytest.mark.parametrize(
    ("backend", "transport"),
    [("pymemcache", "tls"), ("pymemcache", "clear"), ("pylibmc", "clear")],
)
def test_a_failed_batch_writes_nothing_after_it_returns(
    elasticache_cluster_factory,
    make_pylibmc_cache,
    make_pymemcache_cache,
    backend,
    transport,
    event_loop_kind,
) -> None:
    """
    One node's part fails at once (refused), the other's is still writing: ``aset_many``
    returns only when that part is done, reports exactly the keys not stored, and a delete
    that follows is not undone by writes of the earlier call.
    """
    tls = transport == "tls"
    cluster = elasticache_cluster_factory(nodes=2, tls=tls)
    make = make_pymemcache_cache if backend == "pymemcache" else make_pylibmc_cache
    options: dict[str, Any] = {"IGNORE_EXCEPTIONS": True}
    if tls:
        options |= {"TLS": cluster.client_tls_context(), "POOL_SIZE": 1}
    cache = make(cluster.location, **options)
    dead, alive = cluster.nodes
    count = BATCH_KEYS[transport]
    alive_keys = keys_for(cache, alive, count, "alive")
    dead_keys = keys_for(cache, dead, 5, "dead")
    cluster.kill_node(dead)

    async def scenario() -> tuple[list[str], set[str], set[str], set[str]]:
        failed = await cache.aset_many(dict.fromkeys(dead_keys + alive_keys, "v"))
        present_on_return = set(await cache.aget_many(alive_keys))
        await asyncio.sleep(SETTLE)
        present_later = set(await cache.aget_many(alive_keys))
        await cache.adelete_many(alive_keys)
        await asyncio.sleep(SETTLE)
        return failed, present_on_return, present_later, set(await cache.aget_many(alive_keys))

    failed, present_on_return, present_later, present_after_delete = event_loop_kind.run(
        scenario()
    )
    assert present_later == present_on_return
    assert sorted(failed) == sorted(dead_keys + [k for k in alive_keys if k not in present_later])
    assert present_after_delete == set()


def test_a_cancelled_batch_writes_nothing_after_the_cancellation(
    elasticache_cluster_factory, make_pymemcache_cache, event_loop_kind
) -> None:
    """
    ``wait_for`` gives up on ``aset_many`` mid-batch: no write of it comes later (every
    part is cancelled and has ended before the cancellation reaches the caller).
    """
    cluster = elasticache_cluster_factory(nodes=2, tls=True)
    cache = make_pymemcache_cache(cluster.location, TLS=cluster.client_tls_context(), POOL_SIZE=1)
    keys = [f"cancelled:{index}" for index in range(400)]

    async def scenario() -> tuple[int, int]:
        await cache.aget(keys[0])  # Connected: the batch itself is what gets interrupted.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cache.aset_many(dict.fromkeys(keys, "v")), 0.01)
        present_on_cancel = len(await cache.aget_many(keys))
        await asyncio.sleep(SETTLE)
        return present_on_cancel, len(await cache.aget_many(keys))

    present_on_cancel, present_later = event_loop_kind.run(scenario())
    assert present_on_cancel < len(keys)  # Interrupted mid-batch, as the test intends.
    assert present_later == present_on_cancel


def test_a_stalled_node_leaves_no_unretrieved_future(
    elasticache_cluster_factory, make_cache, caplog
) -> None:
    """One batch to a stopped node times out: asyncio logs no 'never retrieved' error."""
    cluster = elasticache_cluster_factory(nodes=1)
    options, _ = timeout_rules(type(make_cache(cluster.location)))
    cache = make_cache(cluster.location, IGNORE_EXCEPTIONS=True, **options)
    node = cluster.nodes[0]
    data = {f"stalled:{index}": "v" for index in range(500)}
    assert asyncio.run(cache.aget(key_routed_to(cache, node))) is None  # Connected.
    caplog.set_level(logging.ERROR, logger="asyncio")
    with stopped(node):
        failed = asyncio.run(cache.aset_many(data))
    gc.collect()
    assert sorted(failed) == sorted(data)
    assert [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()] == []


def test_a_waiter_cancelled_as_it_is_woken_passes_the_slot_on(
    elasticache_cluster_factory, make_pymemcache_cache
) -> None:
    """
    One TLS connection, one request in flight: the first call's reply frees the slot and
    wakes the second, which its caller cancels in that same loop iteration. The third must
    get the slot, not sleep until some unrelated call completes.
    """
    cluster = elasticache_cluster_factory(nodes=1, tls=True)
    cache = make_pymemcache_cache(cluster.location, TLS=cluster.client_tls_context(), POOL_SIZE=1)
    cache.set("key", "value")

    async def scenario() -> Any:
        assert await cache.aget("key") == "value"  # Connected.
        second: asyncio.Task[Any] | None = None

        async def first() -> None:
            await cache.aget("key")
            # Resumed by the reply that also woke the second: cancel it before it runs.
            assert second is not None
            second.cancel()

        first_task = asyncio.ensure_future(first())
        second = asyncio.ensure_future(cache.aget("key"))
        third = asyncio.ensure_future(asyncio.wait_for(cache.aget("key"), 5.0))
        await first_task
        with pytest.raises(asyncio.CancelledError):
            await second
        return await third

    assert asyncio.run(scenario()) == "value"


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_loop_dropped_without_closing_is_not_kept_alive(elasticache_cluster, make_cache) -> None:
    """
    Loops created and dropped without ``close()`` after one call each: the cache keeps
    neither the loops nor their sockets (nor their selectors) alive.
    """
    cache = make_cache(elasticache_cluster.location)
    cache.set("key", "value")
    gc.collect()
    fds_before = open_fds()
    loops = []
    for _ in range(50):
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(cache.aget("key")) == "value"
        loops.append(weakref.ref(loop))
        del loop
    gc.collect()
    assert sum(ref() is not None for ref in loops) == 0
    # Four descriptors a loop (selector, wake-up pair, node socket) if kept. Other threads
    # of the process (discovery, the local cluster's relay) open and close a few of their
    # own at any moment: wait for those to settle.
    eventually(lambda: len(open_fds() - fds_before) < 25, "the dropped loops' descriptors closed")


def open_fds() -> set[str]:
    """What this process's file descriptors point at: sockets, pipes, files."""
    targets = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


def test_a_call_cancelled_while_connecting_leaves_no_connection_behind(
    elasticache_cluster, make_cache, event_loop_kind
) -> None:
    """
    A call is cancelled at every step of opening its connection in turn: whatever the
    cancelled attempt opened is closed, and the loop goes on with the one connection it uses.
    """
    cluster = elasticache_cluster
    cache = make_cache(cluster.location)
    cache.set("key", "value")

    baseline = open_connections(cluster)

    def opened_by_this_loop() -> bool:
        # The node counts a connection until it has read its end: poll for it to settle.
        return open_connections(cluster) == baseline + 1

    async def cancelled_after(steps: int) -> None:
        call = asyncio.ensure_future(cache.aget("key"))
        for _ in range(steps):
            await asyncio.sleep(0)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        assert await cache.aget("key") == "value"
        eventually(opened_by_this_loop, f"one connection after a cancel at step {steps}")

    for steps in range(40):
        event_loop_kind.run(cancelled_after(steps))
        eventually(lambda: open_connections(cluster) == baseline, "the loop's connection closed")


@pytest.mark.parametrize("call", ["aget", "aget_many"])
def test_a_reply_holding_a_key_not_asked_for_is_the_librarys_protocol_error(
    elasticache_cluster_factory, make_cache, call
) -> None:
    """
    A stray request goes out on the loop's connection ahead of a get: its reply, read as
    the get's, holds a key not asked for. The connection is out of step: closed, and the
    library's protocol error (naming the key) raised; the next call reads the right value.
    """
    cluster = elasticache_cluster_factory(nodes=1)
    cache = make_cache(cluster.location)
    cache.set("key", "value")
    cache.set("stray", "not asked for")
    stray = cache.make_key("stray")
    node = cluster.nodes[0]

    async def scenario() -> tuple[Exception, Any]:
        assert await cache.aget("key") == "value"  # Connected.
        (channel,) = loop_connections().channels.values()
        (connection,) = channel._connections
        with stopped(node):  # Both requests wait, in order, for the node.
            connection._transport.write(f"get {stray}\r\n".encode())
            getting = asyncio.ensure_future(
                cache.aget("key") if call == "aget" else cache.aget_many(["key"])
            )
            await asyncio.sleep(0.05)
        error = None
        try:
            await asyncio.wait_for(getting, 5.0)
        except Exception as raised:
            error = raised
        assert error is not None, "the stray reply was taken for the get's"
        return error, await cache.aget("key")

    error, after = asyncio.run(scenario())
    assert isinstance(error, cache.server_errors)
    assert type(error).__name__ in ("ProtocolError", "MemcacheUnknownError")
    assert repr(stray.encode()) in str(error)
    assert after == "value"


def test_aincr_takes_deltas_up_to_2_64_minus_1_and_refuses_larger_ones(
    elasticache_cluster, make_cache
) -> None:
    """memcached's delta is unsigned 64-bit: 2**64-1 wraps, 2**64 is the library's client error."""
    cache = make_cache(elasticache_cluster.location)

    async def scenario() -> tuple[int, Exception, Exception]:
        await cache.aset("counter", 1)
        wrapped = await cache.aincr("counter", 2**64 - 1)
        errors = []
        for delta in (2**64, -(2**64)):
            try:
                await cache.aincr("counter", delta)
            except Exception as error:
                errors.append(error)
        assert len(errors) == 2, errors
        return wrapped, errors[0], errors[1]

    wrapped, too_large, too_small = asyncio.run(scenario())
    assert wrapped == 0
    for error in (too_large, too_small):
        assert type(error).__name__ in ("ClientError", "MemcacheClientError")
        assert cache._is_caller_error(error)
    assert cache.get("counter") == 0
