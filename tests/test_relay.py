"""Nodes of a LocalCluster answer discovery like ElastiCache nodes, through a relay that
passes every other command to the real memcached unchanged."""

from __future__ import annotations

import contextlib
import gc
import socket
import ssl
from collections.abc import Iterator

import pylibmc
import pytest
from pymemcache.client.base import Client as PymemcacheClient
from support import eventually, parse_config_reply, read_until_closed, survivors

from django_elasticache.cluster_utils import ClusterNode, DiscoveryNotSupported, discover
from django_elasticache.testing import LocalCluster, MemcachedNode, start_memcached
from django_elasticache.testing.relay import Relay, data_length
from django_elasticache.testing.serverless import DELAYED_FLUSH_REPLY, ServerlessRules

TIMEOUT = 5.0
CONFIG_GET = b"config get cluster\r\n"
LEGACY_GET = b"get AmazonElastiCache:cluster\r\n"
QUIT = b"quit\r\n"


def exchange(node: MemcachedNode, request: bytes) -> bytes:
    """Send request then ``quit`` to a node; every byte until it closes."""
    with socket.create_connection((node.ip, node.port), timeout=TIMEOUT) as conn:
        conn.sendall(request + QUIT)
        return read_until_closed(conn)


def config_of(cluster: LocalCluster) -> tuple[int, list[tuple[str, str, int]]]:
    return cluster.config_version, [(node.hostname, node.ip, node.port) for node in cluster.nodes]


def pylibmc_client(node: MemcachedNode, binary: bool = False) -> pylibmc.Client:
    behaviors = {"connect_timeout": 2000, "_poll_timeout": 2000}
    return pylibmc.Client([node.address], binary=binary, behaviors=behaviors)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(nodes=3) as cluster:
        yield cluster


def test_every_node_answers_config_get_cluster(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        assert parse_config_reply(exchange(node, CONFIG_GET)) == config_of(cluster)


def test_discover_at_a_node_returns_the_current_config(cluster: LocalCluster) -> None:
    node = cluster.nodes[1]
    added = cluster.add_node()

    config = discover(node.ip, node.port, TIMEOUT)

    assert config.version == cluster.config_version == 2
    assert config.nodes == tuple(ClusterNode(n.hostname, n.ip, n.port) for n in cluster.nodes)
    assert added.address in config.addresses


def test_old_engine_nodes_answer_the_legacy_get_only() -> None:
    with LocalCluster(nodes=2, engine_version="1.4.10") as cluster:
        node = cluster.nodes[0]
        reply = exchange(node, b"version\r\n" + CONFIG_GET + LEGACY_GET)
        version, rest = reply.split(b"\r\n", 1)
        assert version == b"VERSION 1.4.10"
        error, legacy = rest.split(b"\r\n", 1)
        assert error == b"ERROR"  # memcached's own answer, as on a real 1.4.10 node
        assert legacy.startswith(b"VALUE AmazonElastiCache:cluster 0 ")
        assert discover(node.ip, node.port, TIMEOUT).addresses == tuple(cluster.node_addresses)


def test_pipelined_replies_keep_request_order(cluster: LocalCluster) -> None:
    node = cluster.nodes[0]
    config = exchange(node, CONFIG_GET)

    reply = exchange(
        node,
        b"set a 5 0 1\r\n1\r\nget a\r\n" + CONFIG_GET + b"set b 0 0 1 noreply\r\n2\r\n"
        b"get b\r\n" + CONFIG_GET + b"version\r\n" + CONFIG_GET,
    )

    assert reply == (
        b"STORED\r\nVALUE a 5 1\r\n1\r\nEND\r\n" + config + b"VALUE b 0 1\r\n2\r\nEND\r\n"
        + config + b"VERSION 1.6.18\r\n" + config
    )  # fmt: skip


def test_values_that_look_like_commands_are_stored_verbatim(cluster: LocalCluster) -> None:
    node = cluster.nodes[2]
    value = CONFIG_GET + LEGACY_GET + b"\x00\xff\r\nEND\r\n" + bytes(range(256))
    request = b"set tricky 77 0 %d\r\n%s\r\nget tricky\r\n" % (len(value), value)
    meta = b"ms m %d T0\r\n%s\r\nmg m v\r\n" % (len(CONFIG_GET), CONFIG_GET)

    reply = exchange(node, request + meta)

    assert reply == (
        b"STORED\r\nVALUE tricky 77 %d\r\n%s\r\nEND\r\n" % (len(value), value)
        + b"HD\r\nVA %d\r\n%s\r\n" % (len(CONFIG_GET), CONFIG_GET)
    )


def test_pymemcache_through_the_relay(cluster: LocalCluster) -> None:
    node = cluster.nodes[0]
    client = PymemcacheClient((node.ip, node.port), connect_timeout=TIMEOUT, timeout=TIMEOUT)
    big = bytes(range(256)) * 3900  # just under memcached's 1 MB item limit
    many = {f"key{index}": b"v%d" % index for index in range(500)}
    try:
        assert client.set("big", big)
        assert client.get("big") == big
        assert client.set_many(many, noreply=False) == []
        assert client.get_many(list(many)) == many
        client.set("quiet", b"q", noreply=True)
        assert client.gets("quiet")[0] == b"q"
        assert client.incr("counter", 1) is None
        client.set("counter", b"41")
        assert client.incr("counter", 1) == 42
        assert client.delete("quiet", noreply=False) is True
        assert client.get("quiet") is None
    finally:
        client.close()
    assert node.holds(["big", "key7", "counter", "quiet"]) == 3


@pytest.mark.parametrize("binary", [False, True])
def test_pylibmc_through_the_relay(cluster: LocalCluster, binary: bool) -> None:
    node = cluster.nodes[1]
    client = pylibmc_client(node, binary=binary)
    values = {f"k{index}": {"index": index, "data": b"\x00" * index} for index in range(200)}

    client.set_multi(values)

    assert client.get_multi(list(values)) == values
    assert client.get("k3") == values["k3"]
    assert cluster.keys_per_node(list(values))[node.address] == 200


def test_a_killed_node_refuses_and_a_restarted_one_answers(cluster: LocalCluster) -> None:
    node = cluster.nodes[0]
    client = pylibmc_client(node)
    client.set("k", "v")
    with socket.create_connection((node.ip, node.port), timeout=TIMEOUT) as idle:
        cluster.kill_node(node)

        assert read_until_closed(idle) == b""  # an open connection is cut off
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((node.ip, node.port), timeout=TIMEOUT)
    with pytest.raises(ConnectionRefusedError):
        PymemcacheClient((node.ip, node.port), timeout=TIMEOUT).get("k")
    with pytest.raises(OSError):
        node.holds(["k"])

    cluster.restart_node(node)

    assert parse_config_reply(exchange(node, CONFIG_GET)) == config_of(cluster)
    assert pylibmc_client(node).get("k") is None  # back, empty
    assert node.holds(["k"]) == 0


def test_replaced_node_answers_with_the_new_config(cluster: LocalCluster) -> None:
    replacement = cluster.replace_node(cluster.nodes[2])

    for node in cluster.nodes:
        assert parse_config_reply(exchange(node, CONFIG_GET)) == config_of(cluster)
    assert parse_config_reply(exchange(replacement, CONFIG_GET))[0] == 2


def test_direct_nodes_answer_discovery_like_stock_memcached() -> None:
    with LocalCluster(nodes=1, relay=False) as cluster:
        node = cluster.nodes[0]
        assert not cluster.relayed
        assert exchange(node, CONFIG_GET) == b"ERROR\r\n"
        with pytest.raises(DiscoveryNotSupported):
            discover(node.ip, node.port, TIMEOUT)
        assert node.holds(["nothing"]) == 0


def test_tls_nodes_answer_discovery_over_tls() -> None:
    with LocalCluster(nodes=2, tls=True) as cluster:
        context = cluster.client_tls_context()
        for node in cluster.nodes:
            with (
                socket.create_connection((node.ip, node.port), timeout=TIMEOUT) as raw,
                context.wrap_socket(raw, server_hostname=node.hostname) as conn,
            ):
                conn.sendall(b"set k 0 0 3\r\nabc\r\n" + CONFIG_GET + b"get k\r\n" + QUIT)
                reply = read_until_closed(conn)
            stored, rest = reply.split(b"\r\n", 1)
            config, value = rest.split(b"END\r\n", 1)
            assert stored == b"STORED"
            assert parse_config_reply(config + b"END\r\n") == config_of(cluster)
            assert value == b"VALUE k 0 3\r\nabc\r\nEND\r\n"
            client = PymemcacheClient(
                (node.ip, node.port), tls_context=_named(context, node), timeout=TIMEOUT
            )
            big = b"\xab" * 500_000
            client.set("big", big)
            assert client.get("big") == big
            client.close()


def _named(context: ssl.SSLContext, node: MemcachedNode) -> ssl.SSLContext:
    """pymemcache checks the certificate against the IP it dials; the node's names its
    hostname, so this test pins the CA and skips the name check."""
    context.check_hostname = False
    return context


@pytest.mark.parametrize(
    ("line", "length"),
    [
        (b"set k 0 0 5", 7),
        (b"cas k 0 0 10 99 noreply", 12),
        (b"append k 0 0 0", 2),
        (b"ms k 3 T0", 5),
        (b"get k", 0),
        (b"set k 0 0 -1", 0),
        (b"set k", 0),
        (b"", 0),
    ],
)
def test_data_length_follows_the_text_protocol(line: bytes, length: int) -> None:
    assert data_length(line.split()) == length


def test_serverless_rules_leave_ordinary_commands_alone() -> None:
    rules = ServerlessRules()
    assert rules.reply_to(b"flush_all") is None
    assert rules.reply_to(b"flush_all 0") is None
    assert rules.reply_to(b"flush_all noreply") is None
    assert rules.reply_to(b"flush_all 10") == DELAYED_FLUSH_REPLY
    assert rules.reply_to(b"get " + b"k" * 16_380) is None
    assert rules.reply_to(b"get " + b"k " * 8_200) == b"CLIENT_ERROR line too long\r\n"
    assert rules.reply_to(b"mg " + b"k" * 20_000) is None


def test_nodes_answer_while_the_endpoint_misbehaves(cluster: LocalCluster) -> None:
    cluster.endpoint.misbehave("garbage")
    node = cluster.nodes[0]

    assert discover(node.ip, node.port, TIMEOUT).addresses == tuple(cluster.node_addresses)
    assert cluster.endpoint.discovery_requests == 0  # a node's answer is not the endpoint's


def test_a_long_pipeline_arrives_whole(cluster: LocalCluster) -> None:
    node = cluster.nodes[1]
    sets = b"".join(b"set p%d 0 0 4 noreply\r\n%04d\r\n" % (i, i) for i in range(5000))
    gets = b"get " + b" ".join(b"p%d" % i for i in range(0, 5000, 50)) + b"\r\n"

    reply = exchange(node, sets + CONFIG_GET + gets)

    config = exchange(node, CONFIG_GET)
    values = b"".join(b"VALUE p%d 0 4\r\n%04d\r\n" % (i, i) for i in range(0, 5000, 50))
    assert reply == config + values + b"END\r\n"


def test_a_cluster_dropped_without_stop_closes_its_nodes() -> None:
    cluster = LocalCluster(nodes=1).start()
    node = cluster.nodes[0]
    where, pid = (node.ip, node.port), node.pid
    del cluster, node
    gc.collect()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(where, timeout=TIMEOUT)
    assert pid is not None and survivors([pid]) == []


def test_pipelined_writes_over_tls() -> None:
    with LocalCluster(nodes=1, tls=True) as cluster:
        node = cluster.nodes[0]
        context = _named(cluster.client_tls_context(), node)
        client = PymemcacheClient((node.ip, node.port), tls_context=context, timeout=TIMEOUT)
        values = {f"t{index}": b"%d" % index * 100 for index in range(2000)}
        try:
            assert client.set_many(values, noreply=False) == []
            assert client.get_many(list(values)) == values
        finally:
            client.close()


def test_a_server_slow_to_accept_holds_up_no_other_connection() -> None:
    """The relay connects to the server behind a front without waiting: a full listen
    backlog there (SYNs dropped, retried after a second) must not stall other fronts."""
    relay = Relay("test relay").start()
    with contextlib.ExitStack() as stack:
        stack.callback(relay.stop)
        full = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=0))
        for _ in range(3):  # fill its accept queue; later connections wait for a SYN retry
            with contextlib.suppress(OSError):
                stack.enter_context(socket.create_connection(full.getsockname(), timeout=0.2))
        node = stack.enter_context(start_memcached())
        slow = relay.open(("127.0.0.1", 0), full.getsockname(), None, None)
        fast = relay.open(("127.0.0.1", 0), (node.ip, node.port), None, None)
        waiting = stack.enter_context(socket.create_connection(slow.address, timeout=TIMEOUT))
        eventually(lambda: slow.connections, "the relay accepted the waiting client")

        with socket.create_connection(fast.address, timeout=TIMEOUT) as conn:
            conn.sendall(b"version\r\n")
            assert conn.recv(4096).startswith(b"VERSION ")

        waiting.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, its server still connecting
            waiting.recv(1)
