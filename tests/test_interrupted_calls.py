"""
Calls interrupted from outside, on real memcached nodes: a signal handler raising in the
middle of a call (as Ctrl-C, a request-timeout signal or a ``gevent.Timeout`` does) never makes
a later call read another request's reply, and never loses a pool slot.

A node stopped with SIGSTOP holds its reply (or stops reading a request) while a timer's
signal interrupts the call; the node goes on once the call was interrupted. The nodes are
direct (no relay), so that a stopped node stops reading at once.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from support import Interrupted, eventually, long_reply_timeout, node_stats, raised_in, stopped

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")

# The libraries' own timeouts are far longer than the interruption, so that only the
# interruption ends the call, however loaded the machine.
LONG_TIMEOUT = 20


class RequestTimedOut(Exception):
    """What a request-timeout signal handler raises."""


INTERRUPTIONS = [Interrupted, RequestTimedOut]


@contextlib.contextmanager
def interrupted_after(seconds: float, interruption: type[BaseException]) -> Iterator[None]:
    """Raise ``interruption`` in this (the main) thread after ``seconds``, from SIGALRM."""

    def raise_interruption(signum: int, frame: object) -> None:
        raise interruption(f"interrupted after {seconds} s")

    previous = signal.signal(signal.SIGALRM, raise_interruption)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_no_slot_lost(cache) -> None:
    """Every client alive is idle: none was lost, none is lent."""
    for pool in cache._cache.pools:
        assert pool.open_count == len(pool._idle)


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_an_interrupted_incr_leaves_no_reply_for_the_next_call(
    elasticache_cluster_factory, make_pymemcache_cache, interruption, tls
) -> None:
    """
    pymemcache closes its socket only on an ``Exception``: an ``incr`` interrupted otherwise
    left its reply for the next call on the client, which read it as its own.
    """
    cluster = elasticache_cluster_factory(nodes=1, tls=tls, relay=False)
    options = {"TLS": cluster.client_tls_context()} if tls else {}
    cache = make_pymemcache_cache(cluster.location, POOL_SIZE=1, timeout=LONG_TIMEOUT, **options)
    cache.set("a", 70)
    cache.set("b", 1000)
    with (
        stopped(cluster.nodes[0]),
        pytest.raises(interruption),
        interrupted_after(0.3, interruption),
    ):
        cache.incr("a")
    assert cache.incr("b") == 1001
    assert cache.get("b") == 1001
    assert cache.get_many(["b"]) == {"b": 1001}
    assert_no_slot_lost(cache)


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_an_interrupted_incr_on_the_pipelined_socket_leaves_no_reply_for_the_next_call(
    elasticache_cluster_factory, make_pylibmc_cache, interruption
) -> None:
    """A delta libmemcached cannot take goes over the pylibmc client's own socket."""
    cluster = elasticache_cluster_factory(nodes=1, relay=False)
    cache = make_pylibmc_cache(
        cluster.location, POOL_SIZE=1, behaviors={"_poll_timeout": LONG_TIMEOUT * 1000}
    )
    cache.set("a", 70)
    cache.set("b", 1000)
    with (
        stopped(cluster.nodes[0]),
        pytest.raises(interruption),
        interrupted_after(0.3, interruption),
    ):
        cache.incr("a", 2**40)
    assert cache.incr("b", 2**40) == 1000 + 2**40
    assert cache.incr("b", 2**40) == 1000 + 2**41
    assert_no_slot_lost(cache)


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_a_get_many_interrupted_while_sending_leaves_nothing_on_the_socket(
    elasticache_cluster_factory, make_pylibmc_cache, interruption
) -> None:
    """
    A get_many whose request is larger than the socket buffers blocks sending to a stopped
    node and is interrupted part-way: the rest of its request must never reach the node
    ahead of the next call's. (It did on pylibmc, whose pipelined socket was kept: the next
    set_many's commands became keys of the cut ``get`` line, and their replies values.)
    """
    cluster = elasticache_cluster_factory(nodes=2, relay=False)
    cache = make_pylibmc_cache(
        cluster.location, POOL_SIZE=1, behaviors={"_poll_timeout": LONG_TIMEOUT * 1000}
    )
    data = {f"key-{index}": f"value {index}" for index in range(20)}
    assert not cache.set_many(data)
    assert cache.get_many(list(data)) == data  # both nodes' pipelined sockets are open
    # About 9 MB of request per node, over twice what loopback buffers for a stopped node.
    huge = [f"{index:0200d}" for index in range(90_000)]
    with (
        stopped(cluster.nodes[0]),
        pytest.raises(interruption),
        interrupted_after(1.5, interruption),
    ):
        cache.get_many(huge)
    renewed = {key: f"renewed {value}" for key, value in data.items()}
    assert not cache.set_many(renewed)
    assert cache.get_many(list(data)) == renewed
    cache.delete_many(list(data))
    assert cache.get_many(list(data)) == {}
    assert_no_slot_lost(cache)


MULTI_KEY_CALLS = {
    "get_many": lambda cache: cache.get_many(["a", "b"]),
    "set_many": lambda cache: cache.set_many({"a": 3, "b": 4}),
    "delete_many": lambda cache: cache.delete_many(["a", "b"]),
}


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
@pytest.mark.parametrize("call", MULTI_KEY_CALLS)
def test_a_call_interrupted_between_its_request_and_its_reply_leaves_no_reply(
    elasticache_cluster_factory, make_cache, call, interruption
) -> None:
    """
    A multi-key call sends its requests, then reads the replies (``routing.start_call``). An
    ``Exception`` raised between the two, before the reading began, left the replies on the
    pooled connection: the next call read them as its own (a get_many returned the values
    the interrupted one asked for; pymemcache's ``get`` raised ``KeyError`` or read
    ``DELETED``).
    """
    cluster = elasticache_cluster_factory(nodes=1, relay=False)
    cache = make_cache(cluster.location, POOL_SIZE=1)
    assert cache.set_many({"a": 1, "b": 2}) == []

    starting = interruption("interrupted as read_replies starts")
    with pytest.raises(interruption), raised_in("read_replies", starting):
        MULTI_KEY_CALLS[call](cache)

    cache.set("a", 10)
    assert cache.get("a") == 10
    cache.delete("b")
    assert cache.get_many(["a", "b"]) == {"a": 10}
    assert_no_slot_lost(cache)


def test_an_interruption_while_pymemcache_parses_a_value_line_reaches_its_raiser(
    elasticache_cluster_factory, make_pymemcache_cache
) -> None:
    """
    pymemcache turns any ``Exception`` raised while it splits a ``VALUE`` line into its own
    ``ValueError("Unable to parse line ...")``: a request-timeout handler's exception landing
    there reached the caller as that ``ValueError``. It is raised as itself, and the
    connection is closed with the reply half read.
    """
    cluster = elasticache_cluster_factory(nodes=1, relay=False)
    cache = make_pymemcache_cache(cluster.location, POOL_SIZE=1)
    cache.set("a", 1)
    cache.set("b", 2)

    def interrupt_the_split(frame: object, event: str, arg: object) -> None:
        splitting = getattr(arg, "__name__", None) == "split"
        if event == "c_call" and splitting and getattr(arg, "__self__", b"")[:5] == b"VALUE":
            sys.setprofile(None)
            raise RequestTimedOut("interrupted while a VALUE line is split")

    sys.setprofile(interrupt_the_split)
    try:
        with pytest.raises(RequestTimedOut):
            cache.get("a")
    finally:
        sys.setprofile(None)

    assert (cache.get("b"), cache.get("a")) == (2, 1)
    assert_no_slot_lost(cache)


GEVENT_SCRIPT = """
from gevent import monkey

monkey.patch_all()

import sys

import django
import gevent
from django.conf import settings

settings.configure(CACHES={}, INSTALLED_APPS=[])
django.setup()

from django_elasticache.pymemcache import ElastiCache

location, pid = sys.argv[1], int(sys.argv[2])
cache = ElastiCache(location, {"OPTIONS": {"POOL_SIZE": 1, "timeout": 20}})
cache.set("a", 70)
cache.set("b", 1000)
import os, signal

os.kill(pid, signal.SIGSTOP)
try:
    for _ in range(1000):  # until the node has stopped (state T), at most 10 s
        if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T":
            break
        gevent.sleep(0.01)
    try:
        with gevent.Timeout(0.3):
            cache.incr("a")
    except gevent.Timeout:
        pass
    else:
        raise AssertionError("the incr was not interrupted")
finally:
    os.kill(pid, signal.SIGCONT)
pool = cache._cache.pools[0]
print(cache.incr("b"), cache.get("b"), pool.open_count, len(pool._idle))
"""


def test_a_gevent_timeout_leaves_no_reply_for_the_next_call(elasticache_cluster_factory):
    """The same under gevent, in a process of its own: a ``gevent.Timeout`` is no Exception."""
    pytest.importorskip("gevent")
    cluster = elasticache_cluster_factory(nodes=1, relay=False)
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, cluster.location, str(cluster.nodes[0].pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.split() == ["1001", "1001", "1", "1"]


def node_of(cluster, pool):
    """The cluster's node a pool talks to."""
    return next(node for node in cluster.nodes if node.port == pool.node.port)


def total_connections(node) -> int:
    """Connections the node accepted since it started, from its ``stats``."""
    return int(node_stats(node)["total_connections"])


def pipelined_socket(client) -> socket.socket:
    """The socket the backend's client sends its pipelined requests on."""
    sock = client._sock if hasattr(client, "_sock") else client.sock
    assert sock is not None
    return sock


def test_a_reply_holding_a_key_not_asked_for_is_a_protocol_error(
    elasticache_cluster_factory, make_cache
) -> None:
    """
    A stray request's reply, waiting on a pooled connection, is read as the reply to the next
    get_many: its key was not asked for, so the connection is out of step. The library's
    protocol error names the node and the key (a server error: a miss under
    IGNORE_EXCEPTIONS), the connection is closed, and the next call reads the right values.
    """
    cluster = elasticache_cluster_factory(nodes=2, relay=False)
    cache = make_cache(cluster.location, POOL_SIZE=1)
    data = {f"key-{index}": index for index in range(20)}
    assert not cache.set_many(data)
    assert cache.get_many(list(data)) == data  # both nodes' connections are open
    pool = cache._cache.pools[0]
    stray = next(
        made
        for made in (cache.make_and_validate_key(f"stray-{index}") for index in range(100))
        if cache._cache.pool_for(made) is pool
    )
    cache._cache.set(stray, b"not asked for")
    sock = pipelined_socket(pool._idle[0])
    sock.sendall(f"get {stray}\r\n".encode())
    assert select.select([sock], [], [], 5)[0], "the stray reply never came"
    # Held, so that the reply read is the stray one alone.
    with stopped(node_of(cluster, pool)), pytest.raises(cache.server_errors) as raised:
        cache.get_many(list(data))
    message = str(raised.value)
    assert type(raised.value).__name__ in ("ProtocolError", "MemcacheUnknownError")
    assert repr(stray.encode()) in message and str(pool.node.port) in message
    assert not cache._is_caller_error(raised.value)
    assert cache.get_many(list(data)) == data
    assert_no_slot_lost(cache)


def test_a_pipelined_call_on_a_silent_node_fails_after_one_timeout(
    elasticache_cluster_factory, make_pylibmc_cache
) -> None:
    """
    A timeout on a pooled connection is not retried on a new one (only a connection the
    node closed is): the call gives up after one timeout, having connected no more.
    """
    from pylibmc import Error as PylibmcError

    cluster = elasticache_cluster_factory(nodes=1, relay=False)
    cache = make_pylibmc_cache(cluster.location, behaviors={"_poll_timeout": 300})
    data = {f"key-{index}": index for index in range(10)}
    assert not cache.set_many(data)  # the pooled pipelined connection is open
    node = cluster.nodes[0]
    before = total_connections(node)
    with stopped(node), pytest.raises(PylibmcError, match="timed out"):
        cache.set_many(data)
    # The stats connection itself is the one more.
    assert total_connections(node) == before + 1
    assert not cache.set_many(data)
    assert cache.get_many(list(data)) == data


def test_an_interruption_while_a_moved_keys_old_copy_is_deleted_ends_the_write(
    elasticache_cluster_factory, make_cache
) -> None:
    """
    After a node-list change, a write of a key that moved first deletes its old copy on its
    former owner. A request timeout raised there (an ``Exception``, not the library's) ends
    the write: it was taken for the former owner's failure, logged and swallowed, and the
    write then passed for done.
    """
    cluster = elasticache_cluster_factory(nodes=3, relay=False)
    probe = make_cache(cluster.location)
    cache = make_cache(cluster.location, REFRESH_INTERVAL=0.2, **long_reply_timeout(type(probe)))
    keys = [cache.make_key(f"moved-{index}") for index in range(200)]
    before = cache._cache
    cluster.add_node()
    eventually(lambda: len(cache._cache.pools) == 4, "the fourth node in the list")
    after = cache._cache
    moved = next(key for key in keys if before.pool_for(key).node != after.pool_for(key).node)
    former = before.pool_for(moved).node
    former_node = next(node for node in cluster.nodes if node.address == former.address)
    key = moved.removeprefix(cache.make_key(""))
    with (
        stopped(former_node),
        pytest.raises(RequestTimedOut),
        interrupted_after(0.3, RequestTimedOut),
    ):
        cache.set(key, "new")
