"""LocalCluster(serverless=True): one TLS endpoint, real memcached behind it, and the
refusals of ElastiCache Serverless."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.exceptions import MemcacheClientError
from support import read_until_closed

from django_elasticache.cluster_utils import DiscoveryNotSupported, discover
from django_elasticache.testing import LocalCluster
from django_elasticache.testing.serverless import MAX_GET_LINE

TIMEOUT = 5.0
QUIT = b"quit\r\n"


@pytest.fixture(scope="module")
def serverless() -> Iterator[LocalCluster]:
    with LocalCluster(serverless=True) as cache:
        yield cache


def endpoint(cache: LocalCluster) -> tuple[str, int]:
    host, port = cache.location.rsplit(":", 1)
    return host, int(port)


def tls_exchange(cache: LocalCluster, request: bytes) -> bytes:
    """Send request then ``quit`` over TLS (certificate checked against the host)."""
    host, port = endpoint(cache)
    context = cache.client_tls_context()
    with (
        socket.create_connection((host, port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        conn.sendall(request + QUIT)
        return read_until_closed(conn)


def client(cache: LocalCluster) -> PymemcacheClient:
    return PymemcacheClient(
        endpoint(cache), tls_context=cache.client_tls_context(), timeout=TIMEOUT
    )


def get_line(command: bytes, length: int) -> bytes:
    """A ``get``/``gets`` command line of exactly length bytes, CRLF not counted."""
    keys, size = [], len(command)
    while size < length:
        key = b"k" * min(200, length - size - 1)
        keys.append(key)
        size += 1 + len(key)
    return b" ".join([command, *keys])


def test_one_tls_endpoint_backed_by_memcached(serverless: LocalCluster) -> None:
    assert serverless.serverless and serverless.tls
    assert serverless.location.startswith("127.0.0.1:")
    assert serverless.node_addresses == [serverless.location]
    cache = client(serverless)
    cache.set("k", b"\x00value\r\nEND\r\n", expire=60)
    assert cache.get("k") == b"\x00value\r\nEND\r\n"
    cache.close()
    assert serverless.keys_per_node(["k"]) == {serverless.location: 1}


def test_plaintext_is_refused(serverless: LocalCluster) -> None:
    with socket.create_connection(endpoint(serverless), timeout=TIMEOUT) as conn:
        conn.sendall(b"version\r\n")
        try:
            received = read_until_closed(conn)
        except ConnectionResetError:
            received = b""
    assert b"VERSION" not in received


def test_no_auto_discovery(serverless: LocalCluster) -> None:
    assert tls_exchange(serverless, b"config get cluster\r\n") == b"ERROR\r\n"
    host, port = endpoint(serverless)
    with pytest.raises(DiscoveryNotSupported):
        discover(host, port, TIMEOUT, serverless.client_tls_context())


def test_flush_all_with_a_delay_is_a_client_error(serverless: LocalCluster) -> None:
    reply = tls_exchange(
        serverless,
        b"set f 0 0 1\r\nx\r\nflush_all 10\r\nget f\r\nflush_all 0\r\nget f\r\n"
        b"set f 0 0 1\r\nx\r\nflush_all\r\nget f\r\n",
    )
    assert reply == (
        b"STORED\r\nCLIENT_ERROR flush_all with a delay is not supported\r\n"
        b"VALUE f 0 1\r\nx\r\nEND\r\nOK\r\nEND\r\nSTORED\r\nOK\r\nEND\r\n"
    )
    cache = client(serverless)
    with pytest.raises(MemcacheClientError):
        cache.flush_all(delay=5, noreply=False)
    assert cache.flush_all(noreply=False) is True
    cache.close()


@pytest.mark.parametrize("command", [b"get", b"gets"])
def test_get_lines_over_16_kb_are_refused(serverless: LocalCluster, command: bytes) -> None:
    at_limit, over = get_line(command, MAX_GET_LINE), get_line(command, MAX_GET_LINE + 1)
    assert (len(at_limit), len(over)) == (16_384, 16_385)

    reply = tls_exchange(serverless, at_limit + b"\r\n" + over + b"\r\nversion\r\n")

    assert reply == b"END\r\nCLIENT_ERROR line too long\r\nVERSION 1.6.18\r\n"


def test_a_large_get_many_must_be_split(serverless: LocalCluster) -> None:
    cache = client(serverless)
    keys = [f"key-{index:0>200}" for index in range(100)]  # about 20 KB of keys
    cache.set_many(dict.fromkeys(keys, b"v"))
    with pytest.raises(MemcacheClientError):
        cache.get_many(keys)
    assert cache.get_many(keys[:50]) == dict.fromkeys(keys[:50], b"v")
    cache.close()


def test_a_serverless_cache_has_no_nodes_to_manage(serverless: LocalCluster) -> None:
    node = serverless.nodes[0]
    for change in (
        serverless.add_node,
        lambda: serverless.remove_node(node),
        lambda: serverless.replace_node(node),
        serverless.publish,
    ):
        with pytest.raises(RuntimeError, match="serverless cache has no nodes"):
            change()


def test_an_outage_and_recovery() -> None:
    with LocalCluster(serverless=True) as cache:
        node = cache.nodes[0]
        cache.kill_node(node)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(endpoint(cache), timeout=TIMEOUT)
        cache.restart_node(node)
        assert tls_exchange(cache, b"version\r\n") == b"VERSION 1.6.18\r\n"
