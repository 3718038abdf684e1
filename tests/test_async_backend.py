"""
The async cache methods on real memcached: the same nodes, values, errors, timeouts and
node health as the sync path, on the event loop, with connections that end with their loop.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
from asgiref.sync import ThreadSensitiveContext
from support import DEADLINE, ForkedChild, ask, eventually, node_stats, stopped, timeout_rules

from django_elasticache.async_client import PIPELINE_DEPTH
from django_elasticache.pool import NodeUnavailable
from django_elasticache.testing import start_memcached


def stored(cluster: Any, made_key: str) -> bytes:
    """The key's value line and data as memcached holds them, flags included."""
    for node in cluster.nodes:
        reply = ask(node, f"get {made_key}\r\n".encode(), b"END\r\n")
        if reply != b"END\r\n":
            return reply
    raise AssertionError(f"no node holds {made_key}")


def open_connections(cluster: Any) -> int:
    """Client connections the nodes have open, not counting the ones asking."""
    return sum(int(node_stats(node)["curr_connections"]) - 1 for node in cluster.nodes)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """What a call did: the value it returned or the class of what it raised."""
    try:
        return "returned", call()
    except Exception as error:
        return "raised", type(error)


def async_outcome(call: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
    async def run() -> Any:
        return await call()

    return outcome(lambda: asyncio.run(run()))


def raised(call: Callable[[], Any]) -> Exception:
    try:
        returned = call()
    except Exception as error:
        return error
    raise AssertionError(f"no exception: the call returned {returned!r}")


def key_routed_to(cache: Any, node: Any) -> str:
    """A key the backend sends to this node, found without talking to any node."""
    keys = (f"probe:{index}" for index in range(1000))
    return next(k for k in keys if cache._cache.pool_for(cache.make_key(k)).node.port == node.port)


def test_every_async_method_round_trips(elasticache_cluster, make_cache, event_loop_kind) -> None:
    cache = make_cache(elasticache_cluster.location)
    data = {f"many:{index}": index for index in range(60)}

    async def scenario() -> None:
        assert await cache.aget("key") is None
        assert await cache.aget("key", "default") == "default"
        assert await cache.aset("key", "value") is None
        assert await cache.aget("key") == "value"
        assert await cache.aadd("key", "other") is False
        assert await cache.aadd("counter", 1) is True
        assert await cache.atouch("key", 60) is True
        assert await cache.atouch("absent", 60) is False
        assert await cache.ahas_key("key") is True
        assert await cache.ahas_key("absent") is False
        assert await cache.aincr("counter", 10) == 11
        assert await cache.adecr("counter", 3) == 8
        assert await cache.aincr("counter", -8) == 0
        with pytest.raises(ValueError, match="Key ':1:absent' not found"):
            await cache.aincr("absent")
        with pytest.raises(ValueError, match="not found"):
            await cache.adecr("absent")
        assert await cache.aget_or_set("made", lambda: "by default") == "by default"
        assert await cache.aget_or_set("made", "ignored") == "by default"
        assert await cache.aincr_version("made") == 2
        assert await cache.aget("made", version=2) == "by default"
        assert await cache.aset_many(data) == []
        assert await cache.aget_many([*data, "absent"]) == data
        await cache.adelete_many(list(data)[:30])
        assert await cache.aget_many(list(data)) == dict(list(data.items())[30:])
        assert await cache.adelete("key") is True
        assert await cache.adelete("key") is False
        await cache.aset("expired", 1, timeout=0)
        assert await cache.aget("expired") is None
        assert await cache.atouch("counter", 0) is True
        assert await cache.aget("counter") is None
        await cache.aclear()
        assert await cache.aget_many(list(data)) == {}
        assert await cache.aclose() is None

    event_loop_kind.run(scenario())
    assert cache.get("made", version=2) is None


VALUES: dict[str, Any] = {
    "int": 42,
    "zero": 0,
    "negative": -7,
    "big_int": 2**70,
    "bytes": b"\x00\xff\r\nEND\r\n",
    "empty_bytes": b"",
    "str": "text",
    "unicode": "é ключ 🎉",
    "true": True,
    "false": False,
    "none": None,
    "float": 1.5,
    "object": {"a": [1, (2, 3)], "b": {4}},
    "large_bytes": b"x" * 700_000,
    "large_str": "y" * 300_000,
}


def test_each_path_reads_what_the_other_wrote(elasticache_cluster, make_cache) -> None:
    """
    Each value, written by either path, reads back alike by both: equal, of the same type
    (pylibmc itself reads a stored True back as 1: so does its async path), and stored
    byte for byte the same, flags included.
    """
    cache = make_cache(elasticache_cluster.location)
    for name, value in VALUES.items():
        cache.set(f"sync:{name}", value)

    async def write_then_read() -> dict[str, Any]:
        for name, value in VALUES.items():
            await cache.aset(f"async:{name}", value)
        return {
            f"{writer}:{name}": await cache.aget(f"{writer}:{name}")
            for writer in ("sync", "async")
            for name in VALUES
        }

    read_async = asyncio.run(write_then_read())
    for name, value in VALUES.items():
        reads = [cache.get(f"sync:{name}"), cache.get(f"async:{name}")]
        reads += [read_async[f"sync:{name}"], read_async[f"async:{name}"]]
        assert all(read == value for read in reads), name
        assert len({type(read) for read in reads}) == 1, (name, reads)
        sync_item = stored(elasticache_cluster, cache.make_key(f"sync:{name}"))
        async_item = stored(elasticache_cluster, cache.make_key(f"async:{name}"))
        assert async_item.replace(b":1:async:", b":1:sync:", 1) == sync_item, name


def test_many_key_calls_cross_between_the_paths(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)
    data = {f"k{index}": VALUES[name] for index, name in enumerate(VALUES)}
    cache.set_many(data)
    assert asyncio.run(cache.aget_many(list(data))) == data
    asyncio.run(cache.adelete_many(list(data)))
    assert cache.get_many(list(data)) == {}


def test_unicode_keys_cross_between_the_paths(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)
    cache.set("ключ:sync", "from sync")
    asyncio.run(cache.aset("ключ:async", "from async"))
    assert asyncio.run(cache.aget("ключ:sync")) == "from sync"
    assert cache.get("ключ:async") == "from async"


def test_many_keys_on_one_node_beyond_the_pipeline_depth(
    elasticache_cluster_factory, make_cache
) -> None:
    cluster = elasticache_cluster_factory(nodes=1)
    cache = make_cache(cluster.location)
    data = {f"k{index}": index for index in range(3 * PIPELINE_DEPTH + 7)}

    async def scenario() -> None:
        assert await cache.aset_many(data) == []
        assert await cache.aget_many(list(data)) == data
        await cache.adelete_many(list(data))

    asyncio.run(scenario())
    assert cache.get_many(list(data)) == {}


def test_value_too_large_fails_as_on_the_sync_path(elasticache_cluster, make_cache) -> None:
    too_large = b"x" * (2 * 1024 * 1024)
    for options in ({}, {"IGNORE_EXCEPTIONS": True}):
        cache = make_cache(elasticache_cluster.location, **options)
        sync = outcome(lambda cache=cache: cache.set("big", too_large))
        assert async_outcome(lambda cache=cache: cache.aset("big", too_large)) == sync, options
    # The connection stays in step after the refusal.
    assert asyncio.run(cache.aset("after", 1)) is None
    assert cache.get("after") == 1


def test_sync_and_async_meet_on_10000_keys_across_a_node_list_change(
    elasticache_cluster, make_cache
) -> None:
    cluster = elasticache_cluster
    cache = make_cache(cluster.location, REFRESH_INTERVAL=0.2)
    keys = [f"user:{index}:profile" for index in range(10_000)]

    def both_ways(tag: str) -> None:
        cache.set_many({key: f"{tag}:sync:{key}" for key in keys})

        async def read_then_write() -> list[Any]:
            found = await asyncio.gather(*(cache.aget(key) for key in keys))
            await asyncio.gather(*(cache.aset(key, f"{tag}:async:{key}") for key in keys))
            return found

        assert asyncio.run(read_then_write()) == [f"{tag}:sync:{key}" for key in keys]
        assert cache.get_many(keys) == {key: f"{tag}:async:{key}" for key in keys}
        held = cluster.keys_per_node([cache.make_key(key) for key in keys])
        assert sum(held.values()) == len(keys) and all(held.values()), held

    both_ways("three nodes")
    cluster.add_node()

    def sees_four_nodes() -> bool:
        cache.get("probe")  # A request lets the backend notice the new list.
        return len(cache.client_servers) == 4

    eventually(sees_four_nodes, "the fourth node seen")
    both_ways("four nodes")


def test_dead_node_fails_as_on_the_sync_path_and_is_down_for_both(
    elasticache_cluster_factory, make_cache
) -> None:
    cluster = elasticache_cluster_factory(nodes=2)
    cache = make_cache(cluster.location)
    node = cluster.nodes[0]
    key = key_routed_to(cache, node)
    other_key = key_routed_to(cache, cluster.nodes[1])
    cache.set(other_key, 1)
    # Neither path has a connection to the node: both meet a refused connection.
    cluster.kill_node(node)

    sync_error = raised(lambda: cache.get(key))
    async_error = raised(lambda: asyncio.run(cache.aget(key)))
    assert type(async_error) is type(sync_error)
    assert isinstance(async_error, cache.server_errors)
    # One failure from each path: the node is marked down for both.
    with pytest.raises(NodeUnavailable):
        asyncio.run(cache.aget(key))
    with pytest.raises(NodeUnavailable):
        cache.get(key)
    assert asyncio.run(cache.aget(other_key)) == 1

    ignoring = make_cache(cluster.location, IGNORE_EXCEPTIONS=True)

    async def calls_for_the_dead_node() -> tuple[Any, ...]:
        return (
            await ignoring.aget(key, "default"),
            await ignoring.aset(key, 2),
            await ignoring.aadd(key, 2),
            await ignoring.aget_many([key, other_key]),
            await ignoring.ahas_key(key),
            await ignoring.adelete(key),
            await ignoring.aset_many({key: 2}),
        )

    assert asyncio.run(calls_for_the_dead_node()) == (
        "default",
        False,
        False,
        {},
        False,
        False,
        [key],
    )
    with pytest.raises(ValueError, match=f"Key '{key}' not found"):
        asyncio.run(ignoring.aincr(key))


def test_hung_node_times_out_as_on_the_sync_path(
    elasticache_cluster_factory, make_cache, event_loop_kind
) -> None:
    cluster = elasticache_cluster_factory(nodes=1)
    options, timeout_error = timeout_rules(type(make_cache(cluster.location)))
    cache = make_cache(cluster.location, **options)
    cache.set("key", 1)
    run = event_loop_kind.run
    assert run(cache.aget("key")) == 1
    with stopped(cluster.nodes[0]):  # A real memcached that stops answering.
        async_error = raised(lambda: run(cache.aget("key")))
        sync = outcome(lambda: cache.get("key"))
    assert type(async_error) is timeout_error
    # libmemcached 1.1 raises it too; the 1.0 in pylibmc's wheels reads a timeout as a miss.
    assert sync in (("raised", timeout_error), ("returned", None))

    def answers_again() -> bool:
        try:
            return run(cache.aget("key")) == 1
        except NodeUnavailable:
            return False

    eventually(answers_again, "the node answers the async path again")


class LoopOnItsOwnClock(asyncio.SelectorEventLoop):
    """An event loop whose clock is an hour behind ``time.monotonic()``, as a loop may keep."""

    def time(self) -> float:
        return super().time() - 3600.0


def loop_given_a_clock() -> asyncio.AbstractEventLoop:
    """asyncio's own loop, its clock replaced on the instance, as a test may replace it."""
    loop = asyncio.new_event_loop()
    loop.time = lambda: time.monotonic() - 3600.0  # type: ignore[method-assign]
    return loop


@pytest.mark.parametrize("new_loop", [LoopOnItsOwnClock, loop_given_a_clock])
def test_a_loop_on_its_own_clock_times_calls_out_on_it(
    elasticache_cluster_factory, make_cache, new_loop
) -> None:
    """A call's timeout is kept on the loop's clock, whatever clock that is."""
    cluster = elasticache_cluster_factory(nodes=1)
    options, timeout_error = timeout_rules(type(make_cache(cluster.location)))
    cache = make_cache(cluster.location, **options)
    cache.set("key", 1)
    loop = new_loop()
    try:
        assert loop.run_until_complete(cache.aget("key")) == 1
        with stopped(cluster.nodes[0]):
            call = loop.create_task(cache.aget("key"))
            loop.call_later(DEADLINE, call.cancel)  # Cancelled: the timeout never came.
            error = raised(lambda: loop.run_until_complete(call))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert type(error) is timeout_error


def test_async_round_trip_over_tls(
    elasticache_cluster_factory, make_pymemcache_cache, event_loop_kind
) -> None:
    cluster = elasticache_cluster_factory(nodes=3, tls=True)
    cache = make_pymemcache_cache(cluster.location, TLS=cluster.client_tls_context())
    data = {f"k{index}": f"value-{index}" for index in range(300)}
    cache.set("from sync".replace(" ", "_"), {"x": 1})

    async def scenario() -> list[Any]:
        assert await cache.aset_many(data) == []
        assert await cache.aget_many(list(data)) == data
        assert await cache.aget("from_sync") == {"x": 1}
        await cache.aset("from_async", [1, 2])
        assert await cache.aadd("counter", 1) is True
        assert await cache.aincr("counter", 4) == 5
        return await asyncio.gather(*(cache.aget(key) for key in data))

    assert event_loop_kind.run(scenario()) == list(data.values())
    assert cache.get("from_async") == [1, 2]
    held = cluster.keys_per_node([cache.make_key(key) for key in data])
    assert all(held.values()), held


def test_async_tls_refuses_a_node_certificate_for_another_hostname(
    elasticache_cluster_factory, make_pymemcache_cache
) -> None:
    """The node is reached at its listed IP, but must prove the listed hostname."""
    cluster = elasticache_cluster_factory(nodes=1, tls=True)
    certificate = cluster.certificate_authority.issue(["someone-else.cache.local"])
    with start_memcached(tls=certificate, hostname="impostor.cache.local") as impostor:
        cluster.publish([impostor], version=cluster.config_version + 1)
        cache = make_pymemcache_cache(cluster.location, TLS=cluster.client_tls_context())
        with pytest.raises(ssl.SSLCertVerificationError, match=r"impostor\.cache\.local"):
            asyncio.run(cache.aset("key", "value"))
        with pytest.raises(ssl.SSLCertVerificationError):
            cache.set("key", "value")


def test_fifty_concurrent_requests_on_a_shared_instance(
    elasticache_cluster, make_cache, event_loop_kind
) -> None:
    """An instance made before the loop and shared, and one per request, as Django does."""
    shared = make_cache(elasticache_cluster.location)
    shared.set("common", "common value")

    async def request(index: int) -> None:
        async with ThreadSensitiveContext():
            own = make_cache(elasticache_cluster.location)
            for round_ in range(5):
                for cache in (shared, own):
                    value = {"request": index, "round": round_, "pad": "x" * (index * 97)}
                    await cache.aset(f"request:{index}", value)
                    assert await cache.aget(f"request:{index}") == value
                    assert await cache.aget("common") == "common value"

    async def serve() -> None:
        await asyncio.gather(*(request(index) for index in range(50)))

    event_loop_kind.run(serve())


class RecordsItsThread:
    """Unpickling one runs code: it notes the thread that deserializes the value."""

    threads: ClassVar[list[int]] = []

    def __init__(self) -> None:
        self.state = "pickled"  # Without state, unpickling would not call __setstate__.

    def __setstate__(self, state: dict[str, Any]) -> None:
        RecordsItsThread.threads.append(threading.get_ident())
        self.__dict__.update(state)


def test_aget_reads_the_value_on_the_loop_thread(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)
    cache.set("probe", RecordsItsThread())
    RecordsItsThread.threads.clear()

    async def read() -> int:
        async with ThreadSensitiveContext():
            assert isinstance(await cache.aget("probe"), RecordsItsThread)
        return threading.get_ident()

    loop_thread = asyncio.run(read())
    assert RecordsItsThread.threads == [loop_thread]


class JsonSerde:
    """A user's serde: JSON under flag 7."""

    def serialize(self, key: bytes, value: Any) -> tuple[bytes, int]:
        return json.dumps(value).encode(), 7

    def deserialize(self, key: bytes, data: bytes, flags: int) -> Any:
        assert flags == 7
        return json.loads(data)


def test_a_users_serde_is_honoured(elasticache_cluster, make_pymemcache_cache) -> None:
    cache = make_pymemcache_cache(elasticache_cluster.location, serde=JsonSerde())
    cache.set("from_sync", {"a": [1]})
    assert asyncio.run(cache.aget("from_sync")) == {"a": [1]}
    asyncio.run(cache.aset("from_async", {"b": 2}))
    assert cache.get("from_async") == {"b": 2}
    assert stored(elasticache_cluster, cache.make_key("from_async")).startswith(
        b"VALUE :1:from_async 7 8\r\n"
    )


def test_connections_end_with_their_loop(elasticache_cluster, make_cache, event_loop_kind) -> None:
    cluster = elasticache_cluster
    cache = make_cache(cluster.location)
    data = {f"k{index}": index for index in range(100)}
    before = open_connections(cluster)

    async def use_every_node() -> int:
        await cache.aset_many(data)
        return open_connections(cluster)

    during = event_loop_kind.run(use_every_node())
    assert during >= before + len(cluster.nodes)
    eventually(lambda: open_connections(cluster) == before, "the run's loop closed them")

    # A loop closed without shutting down its async generators: uvloop's closes them as it
    # closes, and asyncio's leaves them open for the next loop to close.
    loop = event_loop_kind.new()
    assert loop.run_until_complete(cache.aget_many(list(data))) == data
    loop.close()
    if event_loop_kind.closes_its_transports:
        eventually(lambda: open_connections(cluster) == before, "the loop closed them")
    else:
        assert open_connections(cluster) >= before + len(cluster.nodes)
    assert event_loop_kind.run(cache.aget("k1")) == 1
    eventually(lambda: open_connections(cluster) == before, "the closed loop's sockets closed")


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_never_uses_the_parents_connections(
    elasticache_cluster, make_cache
) -> None:
    cache = make_cache(elasticache_cluster.location)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:

        def on_parent_loop(coroutine: Awaitable[Any]) -> Any:
            return asyncio.run_coroutine_threadsafe(coroutine, loop).result(DEADLINE)

        on_parent_loop(cache.aset("parent", "parent value"))

        def in_child() -> str:  # Its own loop, its own connections.
            found = asyncio.run(cache.aget("parent"))
            asyncio.run(cache.aset("child", "child value"))
            return str(found)

        assert ForkedChild(in_child).report() == "parent value"
        # The parent's connection was not touched: it still reads in step.
        assert on_parent_loop(cache.aget("child")) == "child value"
        assert on_parent_loop(cache.aget("parent")) == "parent value"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(DEADLINE)
        loop.close()


def test_hung_tls_node_times_out_while_connecting_as_on_the_sync_path(
    elasticache_cluster_factory, make_pymemcache_cache
) -> None:
    """A stopped memcached still accepts TCP connections, but never answers the handshake."""
    cluster = elasticache_cluster_factory(nodes=1, tls=True)
    cache = make_pymemcache_cache(
        cluster.location, TLS=cluster.client_tls_context(), connect_timeout=0.3, timeout=0.3
    )
    assert cache.client_servers == cluster.node_addresses  # Discovered before the stop.
    with stopped(cluster.nodes[0]):
        async_error = raised(lambda: asyncio.run(cache.aget("key")))
        sync_error = raised(lambda: cache.get("key"))
    assert type(async_error) is type(sync_error)
    assert isinstance(async_error, TimeoutError)


def test_both_paths_refuse_the_same_input_with_the_same_exception(
    elasticache_cluster, make_cache
) -> None:
    """
    A key of 200 characters is 400 bytes in UTF-8: Django's 250-character check lets it
    through and the library refuses it; a delta of 2**64 is memcached's CLIENT_ERROR. The
    async methods raise what the sync ones raise for each.
    """
    cache = make_cache(elasticache_cluster.location)
    cache.set("n", 1)
    long_key = "é" * 200
    cases = {
        "get": (lambda: cache.get(long_key), lambda: cache.aget(long_key)),
        "set": (lambda: cache.set(long_key, 1), lambda: cache.aset(long_key, 1)),
        "get_many": (lambda: cache.get_many([long_key]), lambda: cache.aget_many([long_key])),
        "incr": (lambda: cache.incr("n", 2**64), lambda: cache.aincr("n", 2**64)),
    }
    for name, (sync_call, async_call) in cases.items():
        with pytest.raises(Exception) as sync_error:
            sync_call()
        with pytest.raises(Exception) as async_error:
            asyncio.run(async_call())
        assert type(async_error.value) is type(sync_error.value), name
