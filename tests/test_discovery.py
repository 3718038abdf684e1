"""Discovery against the configuration-endpoint emulator, over real sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest
from support import requires_ipv6

from django_elasticache import cluster_utils
from django_elasticache.cluster_utils import (
    ClusterConfig,
    ClusterDiscoveryError,
    ClusterNode,
    DiscoveryNotSupported,
    EndpointTimeout,
    EndpointTLSError,
    EndpointUnreachable,
    NodesUnreachable,
    WrongProtocolData,
    ask_version,
    discover,
    discover_from_nodes,
    get_cluster_info,
)
from django_elasticache.testing import ConfigEndpoint, start_memcached
from django_elasticache.testing.tls import CertificateAuthority

TIMEOUT = 0.5
# Generous on a loaded two-core machine; what matters is that a call ends, not how fast.
UPPER_BOUND = TIMEOUT + 3


def connections_to(host: str, port: int) -> int:
    """
    How many sockets of this process are connected to IPv4 ``host:port`` (read from /proc).
    The address, not only the port: nodes on other loopback IPs may share the port number.
    """
    wanted = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                count += fields[2] == wanted and fields[9] in inodes
    return count


def test_discovers_every_advertised_node(elasticache_cluster) -> None:
    config = discover(*split(elasticache_cluster.location), TIMEOUT)
    assert config.version == elasticache_cluster.config_version
    assert list(config.addresses) == elasticache_cluster.node_addresses
    assert [node.hostname for node in config.nodes] == [
        node.hostname for node in elasticache_cluster.nodes
    ]
    assert elasticache_cluster.endpoint.requests == ["version", "config get cluster"]


@pytest.mark.parametrize("engine_version", ["1.4.10", "1.4.5", "1.4.13"])
def test_engines_before_1_4_14_are_asked_the_legacy_way(
    elasticache_cluster_factory, engine_version: str
) -> None:
    cluster = elasticache_cluster_factory(nodes=2, engine_version=engine_version)
    config = discover(*split(cluster.location), TIMEOUT)
    assert list(config.addresses) == cluster.node_addresses
    assert cluster.endpoint.requests == ["version", "get AmazonElastiCache:cluster"]


@pytest.mark.parametrize("engine_version", ["1.4.14", "1.6.22"])
def test_engines_from_1_4_14_are_asked_config_get_cluster(
    elasticache_cluster_factory, engine_version: str
) -> None:
    cluster = elasticache_cluster_factory(nodes=1, engine_version=engine_version)
    discover(*split(cluster.location), TIMEOUT)
    assert cluster.endpoint.requests[-1] == "config get cluster"


def test_node_advertised_without_ip_is_reached_by_hostname(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=2, advertise_ip=False)
    config = discover(*split(cluster.location), TIMEOUT)
    assert [node.ip for node in config.nodes] == ["", ""]
    assert all(address.startswith("localhost:") for address in config.addresses)


def test_plain_memcached_is_reported_as_not_supporting_discovery() -> None:
    with start_memcached() as node:
        with pytest.raises(DiscoveryNotSupported, match=f"at {node.address} failed") as caught:
            discover(node.ip, node.port, TIMEOUT)
        assert caught.value.received == b"ERROR"
        assert get_cluster_info(node.ip, node.port, ignore_cluster_errors=True) == {
            "version": 0,
            "nodes": [node.address],
        }


@pytest.mark.parametrize(
    ("mode", "error", "shown"),
    [
        ("error", DiscoveryNotSupported, "ERROR"),
        ("client_error", WrongProtocolData, "CLIENT_ERROR"),
        ("server_error", WrongProtocolData, "SERVER_ERROR"),
        ("end", WrongProtocolData, "bare END"),
        ("close", WrongProtocolData, "closed the connection"),
        ("truncated", WrongProtocolData, "closed the connection mid-reply; received b'CONFIG"),
        ("garbage", WrongProtocolData, "unexpected reply"),
        ("hang", EndpointTimeout, "timed out"),
    ],
)
def test_misbehaving_endpoint_raises_a_precise_error_in_time(
    elasticache_cluster, mode: str, error: type, shown: str
) -> None:
    elasticache_cluster.endpoint.misbehave(mode)
    started = time.monotonic()
    with pytest.raises(error, match=shown) as caught:
        discover(*split(elasticache_cluster.location), TIMEOUT)
    assert time.monotonic() - started < UPPER_BOUND
    assert elasticache_cluster.location in str(caught.value)
    assert connections_to(*split(elasticache_cluster.location)) == 0


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"CONFIG cluster 0 20\r\nten\nh|127.0.0.1|11211\n\r\nEND\r\n", "not a number"),
        (b"CONFIG cluster 0 13\r\n10\nh|127.0.0.1\n\r\nEND\r\n", r"not hostname\|ip\|port"),
        (b"CONFIG cluster 0 4\r\n10\n\n\r\nEND\r\n", "node list is empty"),
        (b"VALUE SomethingElse 0 2\r\nhi\r\nEND\r\n", "unexpected reply"),
        (b"CONFIG cluster 0 37\r\n%d\nh|127.0.0.1|1\n\r\nEND\r\n" % 10**30, "above 2\\*\\*63"),
        (
            b"CONFIG cluster 0 33\r\n2\nh|127.0.0.1|1 h|127.0.0.1|1\n\r\nEND\r\n",
            r"node listed twice: h\|127.0.0.1\|1",
        ),
        (
            b"CONFIG cluster 0 1\r\n2\n%s\n\r\nEND\r\n"
            % b" ".join(b"h%d|127.0.0.1|%d" % (index, index + 1) for index in range(1001)),
            "1001 nodes listed, more than the 1000 accepted",
        ),
    ],
)
def test_malformed_config_is_refused_with_what_was_received(
    elasticache_cluster, raw: bytes, shown: str
) -> None:
    elasticache_cluster.endpoint.misbehave("raw", raw)
    with pytest.raises(WrongProtocolData, match=shown) as caught:
        discover(*split(elasticache_cluster.location), TIMEOUT)
    assert caught.value.received.startswith(raw.split(b"\r\n")[0])


def test_bytes_after_end_are_ignored_without_waiting(elasticache_cluster) -> None:
    reply = b"CONFIG cluster 0 15\r\n7\nh|127.0.0.1|1\n\r\nEND\r\nEND\r\nstray"
    elasticache_cluster.endpoint.misbehave("raw", reply)
    config = discover(*split(elasticache_cluster.location), TIMEOUT)
    assert config == ClusterConfig(7, (ClusterNode("h", "127.0.0.1", 1),))


def test_reply_without_end_times_out_instead_of_hanging(elasticache_cluster) -> None:
    elasticache_cluster.endpoint.misbehave("raw", b"CONFIG cluster 0 20\r\n1\nh|127.0.0.1|1\n")
    with pytest.raises(EndpointTimeout, match="timed out waiting for the reply"):
        discover(*split(elasticache_cluster.location), TIMEOUT)


def test_non_memcached_server_is_refused_at_the_version_step() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with ConfigEndpoint() as endpoint:
            endpoint.misbehave("hang")
            with pytest.raises(EndpointTimeout, match=endpoint.location):
                discover("127.0.0.1", endpoint.port, TIMEOUT)
        # A listening socket that never accepts still completes the TCP handshake.
        with pytest.raises(EndpointTimeout, match=f"127.0.0.1:{port}"):
            discover("127.0.0.1", port, TIMEOUT)


def test_closed_port_is_unreachable_at_once() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    with pytest.raises(EndpointUnreachable, match="Connection refused"):
        discover("127.0.0.1", port, TIMEOUT)


def test_unresolvable_name_is_unreachable() -> None:
    with pytest.raises(EndpointUnreachable, match="cannot resolve"):
        discover("no-such-host.invalid", 11211, TIMEOUT)


def test_every_discovery_error_is_a_cluster_discovery_error() -> None:
    errors = (
        DiscoveryNotSupported,
        WrongProtocolData,
        EndpointTimeout,
        EndpointTLSError,
        EndpointUnreachable,
        NodesUnreachable,
    )
    for error in errors:
        assert issubclass(error, ClusterDiscoveryError)
    assert issubclass(DiscoveryNotSupported, WrongProtocolData)
    exported = [getattr(cluster_utils, name) for name in cluster_utils.__all__]
    exported_errors = {
        cls for cls in exported if isinstance(cls, type) and issubclass(cls, Exception)
    }
    assert exported_errors == {ClusterDiscoveryError, *errors}


def test_get_cluster_info_keeps_the_1x_shape(elasticache_cluster) -> None:
    host, port = split(elasticache_cluster.location)
    assert get_cluster_info(host, str(port)) == {
        "version": elasticache_cluster.config_version,
        "nodes": elasticache_cluster.node_addresses,
    }


def test_ask_version_reports_a_node_engine(elasticache_cluster) -> None:
    node = elasticache_cluster.nodes[0]
    assert ask_version(node.ip, node.port, TIMEOUT).startswith("1.")


@requires_ipv6
def test_ipv6_endpoint_and_nodes(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=2, host="::1")
    config = discover("::1", cluster.endpoint.port, TIMEOUT)
    assert all(address.startswith("[::1]:") for address in config.addresses)
    assert list(config.addresses) == cluster.node_addresses


def split(location: str) -> tuple[str, int]:
    host, _, port = location.rpartition(":")
    return host.strip("[]"), int(port)


def test_endpoint_given_by_name_is_resolved(elasticache_cluster) -> None:
    config = discover("localhost", elasticache_cluster.endpoint.port, TIMEOUT)
    assert list(config.addresses) == elasticache_cluster.node_addresses


def as_node(hostname: str, server: ConfigEndpoint) -> ClusterNode:
    return ClusterNode(hostname, server.host, server.port)


def test_nodes_are_asked_in_turn_until_one_answers() -> None:
    with ConfigEndpoint() as alive, ConfigEndpoint() as dead:
        alive.publish([("n1", "127.0.0.1", 1), ("n2", "127.0.0.1", 2)], 4)
        dead.stop()
        known = [as_node("n1", alive), as_node("n2", dead)]
        for _ in range(5):  # whichever is picked first
            config = discover_from_nodes(known, TIMEOUT)
            assert config.version == 4 and len(config.nodes) == 2


def test_no_node_answering_names_each_node() -> None:
    with ConfigEndpoint() as hanging, ConfigEndpoint() as plain:
        hanging.misbehave("hang")
        plain.misbehave("error")
        known = [as_node("n1", hanging), as_node("n2", plain)]
        with pytest.raises(NodesUnreachable, match="no node answered") as caught:
            discover_from_nodes(known, TIMEOUT)
    assert hanging.location in str(caught.value) and plain.location in str(caught.value)
    assert "does not support cluster discovery" in str(caught.value)


def test_nodes_are_asked_over_tls_verifying_their_hostnames() -> None:
    with CertificateAuthority() as authority:
        server_tls = authority.server_context(["n1.cache.local"])
        with ConfigEndpoint(tls=server_tls) as node:
            node.publish([("n1.cache.local", "127.0.0.1", node.port)], 3)
            client = authority.client_context()
            assert (
                discover_from_nodes([as_node("n1.cache.local", node)], TIMEOUT, client).version
                == 3
            )
            with pytest.raises(NodesUnreachable, match="certificate verification failed"):
                discover_from_nodes([as_node("impostor.cache.local", node)], TIMEOUT, client)
