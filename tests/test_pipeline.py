"""Pipelined set_many and delete_many on real memcached: every key's outcome, no stale value."""

from __future__ import annotations

import random
import socket
import threading
import time

import pylibmc
import pytest
from django.core.cache import InvalidCacheKey
from django.core.cache.backends.memcached import PyLibMCCache
from hypothesis import given, settings
from hypothesis import strategies as st
from pymemcache.exceptions import MemcacheServerError
from support import DEADLINE, eventually, long_reply_timeout, stopped

from django_elasticache import memcached, pipeline
from django_elasticache.protocol import (
    UNCOPIED_DATA_BYTES,
    Request,
    request_length,
    request_pieces,
    storage_request,
)

OVER_THE_ITEM_SIZE_LIMIT = b"x" * (2 * 1024 * 1024)


def too_large_error(cache: object) -> type[Exception]:
    """What each backend's own one-key set raises for a value over memcached's limit."""
    return pylibmc.TooBig if isinstance(cache, memcached.ElastiCache) else MemcacheServerError


def assert_too_large_value_fails_alone(cache) -> None:
    keys = [f"k{index}" for index in range(60)]
    cache.set_many({key: "old" for key in [*keys, "big"]})
    batch: dict[str, object] = {key: f"new-{key}" for key in keys}
    batch["big"] = OVER_THE_ITEM_SIZE_LIMIT
    with pytest.raises(too_large_error(cache)):
        cache.set_many(batch)
    assert cache.get_many([*keys, "big"]) == {key: f"new-{key}" for key in keys}


def test_too_large_value_in_set_many_fails_alone(elasticache_cluster, make_cache) -> None:
    """The other keys are stored, and the too large key's old value is not readable."""
    assert_too_large_value_fails_alone(make_cache(elasticache_cluster.location))


def test_too_large_value_in_set_many_over_tls_fails_alone(
    elasticache_cluster_factory, make_pymemcache_cache
) -> None:
    cluster = elasticache_cluster_factory(tls=True)
    cache = make_pymemcache_cache(cluster.location, TLS=cluster.client_tls_context())
    assert_too_large_value_fails_alone(cache)


def old_values_then_first_node_killed(cluster, cache) -> list[str]:
    """Keys written on every node, then the first node (the first a batch goes to) killed."""
    keys = [f"k{index}" for index in range(120)]
    cache.set_many({key: "old" for key in keys})
    cluster.kill_node(cluster.nodes[0])
    return keys


def test_set_many_with_a_node_killed_leaves_no_old_value(elasticache_cluster, make_cache) -> None:
    """
    The pooled connections of every node are open when a node dies: the batch of the dead
    node fails and is reported, the batches of the other nodes are still stored.
    """
    cluster = elasticache_cluster
    cache = make_cache(cluster.location)
    keys = old_values_then_first_node_killed(cluster, cache)
    with pytest.raises(cache.server_errors):
        cache.set_many({key: "new" for key in keys})
    reader = make_cache(cluster.location, IGNORE_EXCEPTIONS=True)
    assert {reader.get(key) for key in keys} == {"new", None}


def test_delete_many_with_a_node_killed_deletes_on_the_other_nodes(
    elasticache_cluster, make_cache
) -> None:
    cluster = elasticache_cluster
    cache = make_cache(cluster.location)
    keys = old_values_then_first_node_killed(cluster, cache)
    with pytest.raises(cache.server_errors):
        cache.delete_many(keys)
    reader = make_cache(cluster.location, IGNORE_EXCEPTIONS=True)
    assert {reader.get(key) for key in keys} == {None}


def test_set_many_reports_keys_the_node_did_not_store(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)
    data = {f"k{index}": index for index in range(300)}
    assert cache.set_many(data) == []
    assert cache.get_many(list(data)) == data
    assert cache.set_many(data, timeout=0) == []
    assert cache.get_many(list(data)) == {}


def test_a_one_step_method_replaced_after_use_does_the_call(
    elasticache_cluster, make_cache, monkeypatch
) -> None:
    """
    As Django's own suite does with a mock: a client class's ``set_multi`` replaced after
    ``set_many`` ran on its two-step form does the next call, not that form.
    """
    cache = make_cache(elasticache_cluster.location)
    assert cache.set_many({"key": "value"}) == []
    client_class = cache._class

    def refuse_every_key(self: object, mapping: dict, *args: object, **kwargs: object) -> list:
        return list(mapping)

    monkeypatch.setattr(client_class, "set_multi", refuse_every_key)
    assert cache.set_many({"key": "value"}) == ["key"]


def test_pylibmc_binary_protocol_set_many_is_libmemcacheds(
    elasticache_cluster, make_pylibmc_cache
) -> None:
    cache = make_pylibmc_cache(elasticache_cluster.location, binary=True)
    data = {f"k{index}": {"index": index} for index in range(50)}
    assert cache.set_many(data) == []
    cache.delete_many(list(data)[:25])
    assert cache.get_many(list(data)) == dict(list(data.items())[25:])


def test_tls_set_many_far_beyond_one_tls_record_is_answered(
    elasticache_cluster_factory, make_pymemcache_cache
) -> None:
    """
    Without write bounds memcached 1.6.18 would stop reading this connection; the node
    client's 1 s timeout then fails the call instead of letting it hang.
    """
    cluster = elasticache_cluster_factory(tls=True)
    cache = make_pymemcache_cache(cluster.location, TLS=cluster.client_tls_context(), timeout=1.0)
    small = {f"small-{index}": "v" * 100 for index in range(600)}
    sizes = random.Random(7).choices([1, 10, 100, 1000, 5000, 8000, 9000, 20000], k=300)
    mixed = {f"mixed-{index}": "m" * size for index, size in enumerate(sizes)}
    for data in (small, mixed):
        assert cache.set_many(data) == []
        assert cache.get_many(list(data)) == data


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=2 * UNCOPIED_DATA_BYTES), max_size=600),
    max_write_bytes=st.sampled_from([None, pipeline.TLS_WRITE_BYTES]),
)
def test_writes_stay_within_their_bounds(sizes: list[int], max_write_bytes: int | None) -> None:
    commands = [storage_request(b"set", b"k", 0, 0, b"x" * size) for size in sizes]
    sizes = [request_length(command) for command in commands]
    writes = list(pipeline._writes(commands, max_write_bytes))
    assert pipeline.first_write(commands, max_write_bytes) == (writes[0][1] if writes else 0)
    assert [index for start, end in writes for index in range(start, end)] == list(
        range(len(commands))
    )
    for start, end in writes:
        assert 0 < end - start <= pipeline.MAX_COMMANDS_PER_WRITE
        if max_write_bytes is not None and end - start > 1:
            assert sum(sizes[start:end]) <= max_write_bytes


any_key = (
    st.text(max_size=260)
    | st.text(alphabet=st.characters(max_codepoint=300))
    | st.integers()
    | st.sampled_from(["ok", "x" * 240, "tab\there", "é" * 250])
)


@settings(max_examples=500, deadline=None)
@given(
    keys=st.lists(any_key, max_size=6),
    version=st.none() | st.integers(min_value=0, max_value=10**12),
    key_prefix=st.sampled_from(["", "site", "s p"]),
)
def test_bulk_key_validation_matches_djangos(keys: list, version, key_prefix: str) -> None:
    params = {"KEY_PREFIX": key_prefix}
    ours = memcached.ElastiCache("cfg.example:11211", params)
    django_backend = PyLibMCCache("cfg.example:11211", params)
    outcomes = []
    for make_all in (
        lambda: ours._make_and_validate_keys(keys, version),
        lambda: [django_backend.make_and_validate_key(key, version) for key in keys],
    ):
        try:
            outcomes.append(make_all())
        except InvalidCacheKey as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("operation", ["set_many", "delete_many"])
def test_a_batch_reaches_every_node_before_any_reply_is_read(
    elasticache_cluster_factory, make_cache, operation
) -> None:
    """
    While the first node of a batch holds its reply, the others have already received and
    run their part: a set_many or delete_many over several nodes waits for one round trip
    over all of them, as get_many does, not for one per node in turn.
    """
    cluster = elasticache_cluster_factory(nodes=3, relay=False)
    probe = make_cache(cluster.location)
    cache = make_cache(cluster.location, **long_reply_timeout(type(probe)))
    keys = [f"fan-{index}" for index in range(60)]
    cache.set_many(dict.fromkeys(keys, "old"))
    first_pool = cache._cache.pools[0]
    first_node = next(node for node in cluster.nodes if node.address == first_pool.node.address)
    others = [key for key in keys if cache._cache.pool_for(cache.make_key(key)) is not first_pool]
    assert others and len(others) < len(keys)
    expected = None if operation == "delete_many" else "new"
    reader = make_cache(cluster.location)
    finished = threading.Event()

    def run_batch() -> None:
        if operation == "set_many":
            cache.set_many(dict.fromkeys(keys, "new"))
        else:
            cache.delete_many(keys)
        finished.set()

    with stopped(first_node):
        batch = threading.Thread(target=run_batch)
        batch.start()
        eventually(
            lambda: all(reader.get(key) == expected for key in others),
            f"the other nodes' part of {operation} done while the first node is stopped",
        )
        assert not finished.is_set()
    batch.join(DEADLINE)
    assert finished.is_set()
    assert {cache.get(key) for key in keys} == {expected}


def large_and_small_values() -> dict[str, bytes]:
    """
    Values on both sides of ``protocol.UNCOPIED_DATA_BYTES`` (the large ones are sent in
    pieces, never copied into their request) and small ones between them, every byte random
    so that a piece sent out of place or twice cannot pass.
    """
    rng = random.Random(11)
    sizes = [10, UNCOPIED_DATA_BYTES - 1, UNCOPIED_DATA_BYTES, 200, *[900_000] * 6, 1, 300_000]
    return {f"large-{index}": rng.randbytes(size) for index, size in enumerate(sizes)}


def test_large_values_in_set_many_are_stored_whole(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)
    data = large_and_small_values()
    assert cache.set_many(data) == []
    assert cache.get_many(list(data)) == data
    assert all(cache.get(key) == value for key, value in data.items())


def test_large_values_in_set_many_over_tls_are_stored_whole(
    elasticache_cluster_factory, make_pymemcache_cache
) -> None:
    cluster = elasticache_cluster_factory(tls=True)
    cache = make_pymemcache_cache(cluster.location, TLS=cluster.client_tls_context())
    data = large_and_small_values()
    assert cache.set_many(data) == []
    assert cache.get_many(list(data)) == data


def test_large_values_in_aset_many_are_stored_whole(
    elasticache_cluster, make_cache, event_loop_kind
) -> None:
    cache = make_cache(elasticache_cluster.location)
    data = large_and_small_values()

    async def store_and_read() -> None:
        assert await cache.aset_many(data) == []
        assert await cache.aget_many(list(data)) == data
        assert await cache.aget("large-5") == data["large-5"]

    event_loop_kind.run(store_and_read())


def sender_and_receiver(timeout: float) -> tuple[socket.socket, socket.socket]:
    """A connected pair: a sender with ``timeout`` (one that takes plain writes), small buffers."""
    sender, receiver = socket.socketpair()
    sender.settimeout(timeout)
    for sock in (sender, receiver):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    return sender, receiver


def test_requests_in_pieces_arrive_whole_when_the_peer_reads_late() -> None:
    """
    Far more than the socket buffers hold: the first gathered write goes out in part, the
    rest waits for room. The peer starts reading only once the sender is waiting.
    """
    rng = random.Random(5)
    requests: list[Request] = [
        storage_request(b"set", b"k%d" % index, 0, 0, rng.randbytes(size))
        for index, size in enumerate([10, 700_000, 3, 2_000_000, UNCOPIED_DATA_BYTES, 40])
    ]
    expected = b"".join(request_pieces(requests))
    sender, receiver = sender_and_receiver(timeout=DEADLINE)
    received = bytearray()

    def read_all_late() -> None:
        time.sleep(0.2)
        while chunk := receiver.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=read_all_late)
    reader.start()
    with sender, receiver:
        pipeline.send(sender, requests)
        sender.shutdown(socket.SHUT_WR)
        reader.join(DEADLINE)
    assert not reader.is_alive()
    assert received == expected


def test_requests_in_pieces_to_a_peer_that_never_reads_time_out() -> None:
    sender, receiver = sender_and_receiver(timeout=0.3)
    requests = [storage_request(b"set", b"k", 0, 0, b"x" * 4_000_000)]
    started = time.monotonic()
    with sender, receiver, pytest.raises(TimeoutError):
        pipeline.send(sender, requests)
    assert time.monotonic() - started < DEADLINE
