"""Tests of the local cluster: the endpoint emulator byte for byte, and real memcached nodes.

The discovery client is deliberately not used here: every exchange is raw bytes over a
socket, and the expected replies are built from the Auto Discovery grammar in this file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import pylibmc
import pytest
from support import (
    NodeTuple,
    advertised,
    assert_lists_a_new_three_node_cluster,
    eventually,
    memcached_children,
    parse_config_reply,
    process_exists,
    read_until_closed,
    requires_ipv6,
)

from django_elasticache.testing import (
    ConfigEndpoint,
    LocalCluster,
    MemcachedNotFound,
    start_memcached,
)
from django_elasticache.testing import cluster as cluster_module
from django_elasticache.testing.pytest_plugin import ClusterFactory

pytest_plugins = ["pytester"]

TIMEOUT = 2.0
CONFIG_GET = b"config get cluster\r\n"
LEGACY_GET = b"get AmazonElastiCache:cluster\r\n"
VERSION = b"version\r\n"
# The second node advertises no ip, which the grammar allows.
TWO_NODES = [
    ("cache.abc123.0001.cache.local", "127.0.0.1", 11211),
    ("cache.abc123.0002.cache.local", "", 11212),
]
AWS_EXAMPLE_NODES = [
    ("myCluster.pc4ldq.0001.use1.cache.amazonaws.com", "10.82.235.120", 11211),
    ("myCluster.pc4ldq.0002.use1.cache.amazonaws.com", "10.80.249.27", 11211),
]


def exchange(host: str, port: int, *commands: bytes, quit: bool = True) -> bytes:
    """Send commands (then ``quit``) on one connection; return all bytes until close.

    quit=False is for replies after which the server closes by itself: sending more would
    leave unread bytes at the server, whose close would then reset the connection.
    """
    with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
        conn.sendall(b"".join(commands) + (b"quit\r\n" if quit else b""))
        return read_until_closed(conn)


def ask(endpoint: ConfigEndpoint, *commands: bytes, quit: bool = True) -> bytes:
    return exchange(endpoint.host, endpoint.port, *commands, quit=quit)


def expected_payload(version: int, nodes: Sequence[NodeTuple]) -> bytes:
    """payload = version LF node *(SP node) LF; node = hostname "|" [ip] "|" port."""
    node_list = b" ".join(b"%s|%s|%d" % (h.encode(), ip.encode(), port) for h, ip, port in nodes)
    return b"%d\n%s\n" % (version, node_list)


def expected_reply(header: bytes, payload: bytes) -> bytes:
    return header + b" 0 " + str(len(payload)).encode() + b"\r\n" + payload + b"\r\nEND\r\n"


def discover(host: str, port: int) -> tuple[int, list[NodeTuple]]:
    """Ask a configuration endpoint for its config and parse it by the grammar."""
    return parse_config_reply(exchange(host, port, CONFIG_GET))


def cluster_config(cluster: LocalCluster) -> tuple[int, list[NodeTuple]]:
    return discover(cluster.endpoint.host, cluster.endpoint.port)


def memcached_client(address: str) -> pylibmc.Client:
    return pylibmc.Client([address], behaviors={"connect_timeout": 1000, "_poll_timeout": 1000})


def accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            return True
    except ConnectionRefusedError:
        return False


def wait_for_requests(endpoint: ConfigEndpoint, count: int) -> None:
    """Wait until the endpoint has read count command lines, so a hang is really in effect."""
    eventually(lambda: len(endpoint.requests) >= count, f"the endpoint reads {count} lines")


@pytest.fixture(autouse=True)
def no_memcached_left_behind_by_this_test() -> Iterator[None]:
    yield
    assert memcached_children() == []


@pytest.fixture
def endpoint() -> Iterator[ConfigEndpoint]:
    with ConfigEndpoint() as endpoint:
        endpoint.publish(TWO_NODES, 12)
        yield endpoint


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(nodes=3) as cluster:
        yield cluster


# The configuration endpoint: correct replies


def test_config_reply_matches_the_aws_example(endpoint: ConfigEndpoint) -> None:
    endpoint.publish(AWS_EXAMPLE_NODES, 12)
    assert ask(endpoint, CONFIG_GET) == (
        b"CONFIG cluster 0 136\r\n"
        b"12\nmyCluster.pc4ldq.0001.use1.cache.amazonaws.com|10.82.235.120|11211 "
        b"myCluster.pc4ldq.0002.use1.cache.amazonaws.com|10.80.249.27|11211\n"
        b"\r\nEND\r\n"
    )


def test_config_reply_follows_the_grammar(endpoint: ConfigEndpoint) -> None:
    payload = expected_payload(12, TWO_NODES)
    reply = ask(endpoint, CONFIG_GET)

    assert reply == expected_reply(b"CONFIG cluster", payload)
    header = reply.split(b"\r\n", 1)[0]
    assert int(header.split(b" ")[-1]) == len(payload)
    assert b"0002.cache.local||11212\n" in reply  # an empty ip keeps both pipes


def test_nodes_are_listed_in_hostname_order(endpoint: ConfigEndpoint) -> None:
    endpoint.publish(list(reversed(TWO_NODES)), 13)

    assert endpoint.nodes == tuple(TWO_NODES)
    assert endpoint.config_version == 13
    assert discover(endpoint.host, endpoint.port) == (13, TWO_NODES)


def test_version_reply_follows_the_engine_version(endpoint: ConfigEndpoint) -> None:
    assert ask(endpoint, VERSION) == b"VERSION 1.6.18\r\n"
    endpoint.engine_version = "1.5.16"
    assert ask(endpoint, VERSION) == b"VERSION 1.5.16\r\n"


@pytest.mark.parametrize(
    ("engine_version", "has_config_command"),
    [("1.4.5", False), ("1.4.10", False), ("1.4.13", False), ("1.4.14", True), ("1.10.0", True)],
)
def test_config_command_needs_engine_1_4_14(
    endpoint: ConfigEndpoint, engine_version: str, has_config_command: bool
) -> None:
    endpoint.engine_version = engine_version
    payload = expected_payload(12, TWO_NODES)
    config = expected_reply(b"CONFIG cluster", payload) if has_config_command else b"ERROR\r\n"

    assert ask(endpoint, VERSION) == b"VERSION %s\r\n" % engine_version.encode()
    assert ask(endpoint, CONFIG_GET) == config
    assert ask(endpoint, LEGACY_GET) == expected_reply(b"VALUE AmazonElastiCache:cluster", payload)


def test_one_connection_carries_many_commands(endpoint: ConfigEndpoint) -> None:
    config = expected_reply(b"CONFIG cluster", expected_payload(12, TWO_NODES))

    reply = ask(endpoint, VERSION, CONFIG_GET, b"stats\r\n", b"\r\n", CONFIG_GET)

    assert reply == b"VERSION 1.6.18\r\n" + config + b"ERROR\r\nERROR\r\n" + config


def test_invalid_engine_version_is_refused() -> None:
    with pytest.raises(ValueError, match="dotted numbers"):
        ConfigEndpoint(engine_version="1.6.x")


@requires_ipv6
def test_endpoint_listens_on_ipv6_loopback() -> None:
    with ConfigEndpoint("::1") as endpoint:
        endpoint.publish(TWO_NODES, 3)
        assert endpoint.location == f"[::1]:{endpoint.port}"
        assert discover("::1", endpoint.port) == (3, TWO_NODES)


# The configuration endpoint: misbehaviour


@pytest.mark.parametrize(
    ("mode", "reply"),
    [
        ("error", b"ERROR\r\n"),
        ("client_error", b"CLIENT_ERROR bad command line format\r\n"),
        ("server_error", b"SERVER_ERROR out of memory\r\n"),
        ("end", b"END\r\n"),
    ],
)
def test_canned_misbehaviour_answers_discovery_only(
    endpoint: ConfigEndpoint, mode: str, reply: bytes
) -> None:
    endpoint.misbehave(mode)

    assert ask(endpoint, CONFIG_GET, VERSION, LEGACY_GET) == reply + b"VERSION 1.6.18\r\n" + reply


def test_raw_misbehaviour_sends_exactly_raw_and_keeps_the_connection(
    endpoint: ConfigEndpoint,
) -> None:
    raw = b"CONFIG cluster 0 999\r\n1\nshort\n\r\nEND\r\n"
    endpoint.misbehave("raw", raw)

    assert ask(endpoint, CONFIG_GET, VERSION) == raw + b"VERSION 1.6.18\r\n"


def test_truncated_misbehaviour_sends_half_the_reply_then_closes(
    endpoint: ConfigEndpoint,
) -> None:
    full = expected_reply(b"CONFIG cluster", expected_payload(12, TWO_NODES))
    endpoint.misbehave("truncated")

    assert ask(endpoint, CONFIG_GET, quit=False) == full[: len(full) // 2]


def test_garbage_misbehaviour_sends_non_protocol_bytes_then_closes(
    endpoint: ConfigEndpoint,
) -> None:
    endpoint.misbehave("garbage")

    reply = ask(endpoint, CONFIG_GET, quit=False)

    assert reply
    assert not reply.startswith((b"CONFIG", b"VALUE", b"END", b"ERROR", b"CLIENT_ERROR"))


def test_close_misbehaviour_closes_on_every_command(endpoint: ConfigEndpoint) -> None:
    endpoint.misbehave("close")

    assert ask(endpoint, CONFIG_GET, quit=False) == b""
    assert ask(endpoint, VERSION, quit=False) == b""


@contextlib.contextmanager
def hung_request(endpoint: ConfigEndpoint, command: bytes) -> Iterator[socket.socket]:
    """A connection whose command the hanging endpoint has read and left unanswered."""
    endpoint.misbehave("hang")
    with socket.create_connection((endpoint.host, endpoint.port), timeout=0.5) as conn:
        conn.sendall(command)
        wait_for_requests(endpoint, 1)
        with pytest.raises(TimeoutError):
            conn.recv(4096)
        yield conn


def test_hang_times_out_the_client_and_stop_is_prompt(endpoint: ConfigEndpoint) -> None:
    with hung_request(endpoint, VERSION) as conn:
        started = time.monotonic()
        endpoint.stop()
        assert time.monotonic() - started < 1.5

        conn.settimeout(TIMEOUT)
        assert conn.recv(4096) == b""  # stop() closed the hung connection
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((endpoint.host, endpoint.port), timeout=TIMEOUT)


def test_behave_answers_a_hung_request(endpoint: ConfigEndpoint) -> None:
    with hung_request(endpoint, CONFIG_GET) as conn:
        endpoint.behave()

        conn.settimeout(TIMEOUT)
        conn.sendall(b"quit\r\n")
        assert read_until_closed(conn) == expected_reply(
            b"CONFIG cluster", expected_payload(12, TWO_NODES)
        )


def test_misbehave_validates_its_arguments(endpoint: ConfigEndpoint) -> None:
    with pytest.raises(ValueError, match=r"valid modes: error, client_error.*garbage, raw"):
        endpoint.misbehave("slow")
    with pytest.raises(ValueError, match="raw"):
        endpoint.misbehave("raw")
    with pytest.raises(ValueError, match="raw"):
        endpoint.misbehave("error", b"ERROR\r\n")


def test_stop_closes_idle_connections(endpoint: ConfigEndpoint) -> None:
    with socket.create_connection((endpoint.host, endpoint.port), timeout=TIMEOUT) as conn:
        conn.sendall(VERSION)
        assert conn.recv(4096) == b"VERSION 1.6.18\r\n"

        endpoint.stop()

        assert conn.recv(4096) == b""


# The configuration endpoint: counting


def test_requests_are_counted_whatever_the_reply(endpoint: ConfigEndpoint) -> None:
    ask(endpoint, CONFIG_GET, VERSION, b"bogus command\r\n")
    endpoint.misbehave("error")
    ask(endpoint, LEGACY_GET)

    assert endpoint.discovery_requests == 2
    assert endpoint.requests == [
        "config get cluster",
        "version",
        "bogus command",
        "quit",
        "get AmazonElastiCache:cluster",
        "quit",
    ]

    endpoint.reset_counts()
    assert (endpoint.discovery_requests, endpoint.requests) == (0, [])


def test_counting_is_thread_safe(endpoint: ConfigEndpoint) -> None:
    def client() -> None:
        ask(endpoint, *[CONFIG_GET] * 10)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)

    assert endpoint.discovery_requests == 80
    assert len(endpoint.requests) == 88


# memcached nodes


def test_start_memcached_runs_a_real_server() -> None:
    with start_memcached() as node:
        assert node.is_running
        assert node.address == f"127.0.0.1:{node.port}"
        client = memcached_client(node.address)
        client.set("greeting", "hello")
        assert client.get("greeting") == "hello"
        pid = node.pid
    assert pid is not None
    assert not node.is_running
    assert not process_exists(pid)
    node.stop()  # idempotent


def test_restart_keeps_the_port_and_waits_for_it_to_be_free() -> None:
    with start_memcached() as node:
        port, old_pid = node.port, node.pid
        node.stop()
        squatter = socket.create_server(("127.0.0.1", port))
        threading.Timer(0.3, squatter.close).start()

        node.restart()

        assert (node.port, node.is_running) == (port, True)
        assert node.pid != old_pid
        memcached_client(node.address).set("k", "v")


def test_busy_fixed_port_fails_with_memcached_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_module, "BUSY_PORT_TIMEOUT", 0.2)
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        with pytest.raises(RuntimeError, match="Address already in use"):
            start_memcached(port=port)


def test_missing_memcached_says_how_to_install_it() -> None:
    with pytest.raises(MemcachedNotFound) as missing:
        start_memcached(memcached="/nonexistent/bin/memcached")

    assert isinstance(missing.value, RuntimeError)
    message = str(missing.value)
    assert "/nonexistent/bin/memcached" in message
    assert "apt-get install memcached" in message
    assert "brew install memcached" in message
    with pytest.raises(MemcachedNotFound):
        LocalCluster(memcached="/nonexistent/bin/memcached")


# LocalCluster


def test_cluster_advertises_elasticache_like_nodes(cluster: LocalCluster) -> None:
    config = cluster_config(cluster)

    assert_lists_a_new_three_node_cluster(cluster, config)
    nodes = config[1]
    assert cluster.node_addresses == [f"{ip}:{port}" for _, ip, port in nodes]
    ips = [ipaddress.IPv4Address(ip) for _, ip, _ in nodes]
    assert len(set(ips)) == 3  # one IP per node, so a replacement can keep its port
    assert all(ip in ipaddress.ip_network("127.0.0.0/8") for ip in ips)
    assert ipaddress.IPv4Address("127.0.0.1") not in ips


def test_every_advertised_node_is_a_separate_live_memcached(cluster: LocalCluster) -> None:
    _, nodes = cluster_config(cluster)
    clients = [memcached_client(f"{ip}:{port}") for _, ip, port in nodes]

    for index, client in enumerate(clients):
        client.set("owner", index)
    assert [client.get("owner") for client in clients] == [0, 1, 2]


@pytest.mark.parametrize("relay", [True, False])
def test_every_node_gets_the_memory_asked_for(
    elasticache_cluster_factory: ClusterFactory, relay: bool
) -> None:
    cluster = elasticache_cluster_factory(nodes=2, memory_mb=48, relay=relay)
    added = cluster.add_node()

    for address in [*cluster.node_addresses, f"{added.ip}:{added.port}"]:
        ((_, stats),) = memcached_client(address).get_stats()
        assert stats["limit_maxbytes"] == str(48 * 1024 * 1024).encode()


@pytest.mark.parametrize(
    ("memory_mb", "error", "message"),
    [
        (0, ValueError, "memory_mb must be a whole number of megabytes >= 1, got 0"),
        (-16, ValueError, "got -16"),
        (1.5, TypeError, "memory_mb must be a whole number of megabytes, got 1.5"),
        ("64", TypeError, "got '64'"),
        (True, TypeError, "got True"),
        (None, TypeError, "got None"),
    ],
)
def test_a_bad_memory_size_is_refused_before_anything_starts(
    memory_mb: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        LocalCluster(memory_mb=memory_mb)  # type: ignore[arg-type]


def test_add_node_advertises_a_new_server(cluster: LocalCluster) -> None:
    added = cluster.add_node()

    version, nodes = cluster_config(cluster)
    assert version == cluster.config_version == 2
    assert len(nodes) == 4
    assert nodes[-1] == (added.hostname, added.ip, added.port)
    assert added.hostname == "local.abc123.0004.cache.local"
    memcached_client(added.address).set("k", "v")


def test_remove_node_stops_advertising_and_stops_it(cluster: LocalCluster) -> None:
    removed = cluster.nodes[1]

    cluster.remove_node(removed)

    version, nodes = cluster_config(cluster)
    assert version == 2
    assert nodes == advertised(cluster.nodes)
    assert removed.hostname not in [hostname for hostname, _, _ in nodes]
    assert not removed.is_running
    with pytest.raises(ValueError, match="not an advertised node"):
        cluster.remove_node(removed)


def test_replace_node_keeps_hostname_and_port_with_a_new_ip(cluster: LocalCluster) -> None:
    old = cluster.nodes[0]
    memcached_client(old.address).set("k", "old")

    new = cluster.replace_node(old)

    version, nodes = cluster_config(cluster)
    assert version == 2
    assert nodes[0] == (old.hostname, new.ip, old.port)
    assert (new.hostname, new.port) == (old.hostname, old.port)
    assert new.ip != old.ip
    assert new.ip not in [node.ip for node in cluster.nodes[1:]]
    assert cluster.nodes[0] is new and cluster.node_addresses[0] == new.address
    assert not old.is_running
    assert not accepts_connections(old.ip, old.port)
    assert memcached_client(new.address).get("k") is None  # a new node starts empty
    assert cluster.keys_per_node(["k"]) == dict.fromkeys(cluster.node_addresses, 0)


def test_replacement_skips_an_ip_where_the_port_is_taken(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = cluster.nodes[1]
    monkeypatch.setattr(cluster, "_addresses", cluster_module.LoopbackAddresses("127.201.7.1"))
    with socket.create_server(("127.201.7.1", old.port)):
        new = cluster.replace_node(old)

    assert (new.hostname, new.ip, new.port) == (old.hostname, "127.201.7.2", old.port)
    assert cluster_config(cluster)[1][1] == (old.hostname, "127.201.7.2", old.port)


@requires_ipv6
def test_replace_node_on_ipv6_is_refused_clearly() -> None:
    with LocalCluster(nodes=1, host="::1") as cluster:
        node = cluster.nodes[0]
        with pytest.raises(RuntimeError, match=r"new IP with the same port.*'::1'.*IPv4"):
            cluster.replace_node(node)
        assert cluster.nodes == [node] and node.is_running
        assert cluster.config_version == 1


def test_kill_and_restart_leave_the_config_alone(cluster: LocalCluster) -> None:
    node = cluster.nodes[2]
    before = cluster_config(cluster)

    cluster.kill_node(node)
    assert not accepts_connections(node.ip, node.port)
    assert cluster_config(cluster) == before

    cluster.restart_node(node)
    assert cluster_config(cluster) == before
    client = memcached_client(node.address)
    client.set("k", "back")
    assert client.get("k") == "back"


def test_publish_a_stale_version_and_an_explicit_list(cluster: LocalCluster) -> None:
    first, second, _ = cluster.nodes

    cluster.publish([second, first], version=0)

    assert cluster_config(cluster) == (0, advertised([first, second]))
    assert cluster.nodes == [first, second]
    assert cluster.config_version == 0
    cluster.publish()
    assert cluster_config(cluster) == (0, advertised([first, second]))


def test_engine_version_passes_through_to_the_endpoint(
    elasticache_cluster_factory: ClusterFactory,
) -> None:
    cluster = elasticache_cluster_factory(nodes=1, engine_version="1.4.10")

    assert ask(cluster.endpoint, CONFIG_GET) == b"ERROR\r\n"
    assert ask(cluster.endpoint, LEGACY_GET).startswith(b"VALUE AmazonElastiCache:cluster 0 ")
    cluster.engine_version = "1.6.18"
    assert cluster.endpoint.engine_version == "1.6.18"
    assert cluster_config(cluster)[1] == advertised(cluster.nodes)


def test_without_advertised_ips_clients_must_resolve_localhost() -> None:
    with LocalCluster(nodes=2, advertise_ip=False) as cluster:
        version, nodes = cluster_config(cluster)
        assert version == 1
        assert nodes == [("localhost", "", node.port) for node in cluster.nodes]
        for hostname, _, port in nodes:
            with socket.create_connection((hostname, port), timeout=TIMEOUT) as conn:
                conn.sendall(VERSION)
                assert conn.recv(64) == b"VERSION 1.6.18\r\n"
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        LocalCluster(host="::1", advertise_ip=False)


@requires_ipv6
def test_ipv6_cluster() -> None:
    with LocalCluster(nodes=2, host="::1") as cluster:
        assert cluster.location == f"[::1]:{cluster.endpoint.port}"
        version, nodes = discover("::1", cluster.endpoint.port)
        assert (version, [ip for _, ip, _ in nodes]) == (1, ["::1", "::1"])
        for node in cluster.nodes:
            assert node.address == f"[::1]:{node.port}"
            stored = exchange("::1", node.port, b"set k 0 0 2\r\nhi\r\n", b"get k\r\n")
            assert stored == b"STORED\r\nVALUE k 0 2\r\nhi\r\nEND\r\n"


def test_stop_ends_every_process_the_cluster_ever_started() -> None:
    cluster = LocalCluster(nodes=3).start()
    first, second, third = cluster.nodes
    cluster.remove_node(first)
    replacement = cluster.replace_node(second)
    cluster.kill_node(third)
    added = cluster.add_node()
    pids = [node.pid for node in (first, second, third, replacement, added)]
    endpoint_port = cluster.endpoint.port

    cluster.stop()
    cluster.stop()  # idempotent

    assert all(pid is not None and not process_exists(pid) for pid in pids)
    assert not accepts_connections("127.0.0.1", endpoint_port)


# pytest plugin


def test_elasticache_cluster_fixture(elasticache_cluster: LocalCluster) -> None:
    version, nodes = cluster_config(elasticache_cluster)

    assert (version, len(nodes)) == (1, 3)
    assert all(node.is_running for node in elasticache_cluster.nodes)


def test_fixtures_stop_their_clusters_at_teardown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import json

        def test_inner(elasticache_cluster, elasticache_cluster_factory):
            small = elasticache_cluster_factory(nodes=1, cluster_name="small")
            assert small.nodes[0].hostname == "small.abc123.0001.cache.local"
            clusters = (elasticache_cluster, small)
            pids = [node.pid for cluster in clusters for node in cluster.nodes]
            ports = [cluster.endpoint.port for cluster in clusters]
            with open("started.json", "w") as f:
                json.dump({"pids": pids, "ports": ports}, f)
        """
    )

    pytester.runpytest_inprocess().assert_outcomes(passed=1)

    started = json.loads((pytester.path / "started.json").read_text())
    assert len(started["pids"]) == 4
    assert not any(process_exists(pid) for pid in started["pids"])
    assert not any(accepts_connections("127.0.0.1", port) for port in started["ports"])


def test_replace_node_without_advertised_ips_is_refused_clearly() -> None:
    with LocalCluster(nodes=2, advertise_ip=False) as cluster:
        node = cluster.nodes[0]
        assert node.ip == "127.0.0.1"
        with pytest.raises(RuntimeError, match="advertise_ip=False clients reach every node"):
            cluster.replace_node(node)
        assert cluster.nodes[0] is node and node.is_running
