"""Tests of the local cluster with TLS, as ElastiCache runs it with in-transit encryption.

Raw sockets and the standard ssl module only: a client connects to the advertised IP and
verifies the certificate against the advertised hostname, as a TLS-aware client must.
Every client context here also turns on VERIFY_X509_STRICT, which Python 3.13 enables by
default, so the certificates are held to the strict rules on every Python version.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
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
    CertificateAuthority,
    ConfigEndpoint,
    LocalCluster,
    MemcachedNode,
    start_memcached,
)
from django_elasticache.testing import cluster as cluster_module
from django_elasticache.testing import endpoint as endpoint_module
from django_elasticache.testing.pytest_plugin import ClusterFactory

TIMEOUT = 2.0
Address = tuple[str, int]
# A client talking plaintext to a TLS server must learn it has no memcached there this fast.
FAIL_FAST = 1.0
CONFIG_GET = b"config get cluster\r\n"
VERSION = b"version\r\n"
QUIT = b"quit\r\n"
TLS_ALERT = 0x15  # content type of a TLS alert record
# OpenSSL's X509_V_ERR_* codes, as SSLCertVerificationError.verify_code reports them.
HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH, UNKNOWN_ISSUER = 62, 64, 20


# Helpers


def strict(context: ssl.SSLContext) -> ssl.SSLContext:
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def local(port: int) -> Address:
    """Where the endpoint listens: 127.0.0.1 (each node has an IP of its own)."""
    return ("127.0.0.1", port)


def at(node: MemcachedNode) -> Address:
    return (node.ip, node.port)


def tls_exchange(
    context: ssl.SSLContext, address: Address, server_hostname: str, *commands: bytes
) -> bytes:
    """Connect to address, verify the certificate against server_hostname, send the
    commands and ``quit``, and return every byte until the server closes."""
    with (
        socket.create_connection(address, timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as conn,
    ):
        conn.sendall(b"".join(commands) + QUIT)
        return read_until_closed(conn)


def peer_certificate(context: ssl.SSLContext, address: Address, server_hostname: str) -> dict:
    with (
        socket.create_connection(address, timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as conn,
    ):
        return conn.getpeercert()


def discover_over_tls(cluster: LocalCluster, server_hostname: str = "127.0.0.1") -> tuple:
    context = strict(cluster.client_tls_context())
    reply = tls_exchange(context, local(cluster.endpoint.port), server_hostname, CONFIG_GET)
    return parse_config_reply(reply)


def assert_serves_tls(cluster: LocalCluster, node: MemcachedNode) -> None:
    """The node answers version and a set/get over TLS verified under its hostname."""
    context = strict(cluster.client_tls_context())
    reply = tls_exchange(
        context, at(node), node.hostname, VERSION, b"set k 0 0 2\r\nhi\r\n", b"get k\r\n"
    )
    assert reply == b"VERSION 1.6.18\r\nSTORED\r\nVALUE k 0 2\r\nhi\r\nEND\r\n"


def plaintext_attempt(address: Address) -> tuple[str, bytes, float]:
    """Talk memcached in plaintext to a TLS server; return how it ended, the bytes that
    came back, and how long it took."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(address, timeout=FAIL_FAST) as conn:
        conn.sendall(VERSION)
        try:
            for _ in range(16):
                chunk = conn.recv(4096)
                if not chunk:
                    outcome = "closed"
                    break
                received += chunk
            else:
                outcome = "kept open"
        except ConnectionResetError:
            outcome = "reset"
        except TimeoutError:
            outcome = "timeout"
    return outcome, received, time.monotonic() - started


def assert_refused_plaintext(address: Address) -> None:
    outcome, received, elapsed = plaintext_attempt(address)
    # The server drops the connection (a reset when our bytes were left unread), at most
    # after a TLS alert; it never answers the plaintext command.
    assert outcome in ("closed", "reset"), (outcome, received)
    assert b"VERSION" not in received
    assert received == b"" or received[0] == TLS_ALERT, received
    assert elapsed < FAIL_FAST


# Fixtures


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[LocalCluster]:
    """A three-node TLS cluster shared by the tests that only read from it."""
    with LocalCluster(nodes=3, tls=True) as cluster:
        yield cluster


@pytest.fixture
def fresh_cluster() -> Iterator[LocalCluster]:
    """A two-node TLS cluster for tests that change the topology."""
    with LocalCluster(nodes=2, tls=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def other_ca() -> Iterator[CertificateAuthority]:
    with CertificateAuthority() as ca:
        yield ca


# The configuration endpoint


def test_endpoint_answers_discovery_over_tls(tls_cluster: LocalCluster) -> None:
    assert_lists_a_new_three_node_cluster(tls_cluster, discover_over_tls(tls_cluster))


def test_endpoint_certificate_names_its_host_and_localhost(tls_cluster: LocalCluster) -> None:
    context = strict(tls_cluster.client_tls_context())

    certificate = peer_certificate(context, local(tls_cluster.endpoint.port), "127.0.0.1")

    assert certificate["subjectAltName"] == (("IP Address", "127.0.0.1"), ("DNS", "localhost"))
    assert discover_over_tls(tls_cluster, "localhost")[1] == advertised(tls_cluster.nodes)


def test_endpoint_rejects_a_wrong_hostname(tls_cluster: LocalCluster) -> None:
    context = strict(tls_cluster.client_tls_context())

    with pytest.raises(ssl.SSLCertVerificationError) as failure:
        tls_exchange(context, local(tls_cluster.endpoint.port), "local.abc123.0001.cache.local")

    assert failure.value.verify_code == HOSTNAME_MISMATCH


def test_plaintext_client_to_tls_endpoint_fails_fast(tls_cluster: LocalCluster) -> None:
    tls_cluster.endpoint.reset_counts()

    assert_refused_plaintext(local(tls_cluster.endpoint.port))

    assert tls_cluster.endpoint.requests == []  # no plaintext line was ever read as a command


def test_silent_client_is_dropped_after_the_handshake_timeout(
    monkeypatch: pytest.MonkeyPatch, other_ca: CertificateAuthority
) -> None:
    monkeypatch.setattr(endpoint_module, "HANDSHAKE_TIMEOUT", 0.2)
    with ConfigEndpoint(tls=other_ca.server_context(["127.0.0.1"])) as endpoint:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=TIMEOUT) as conn:
            assert conn.recv(4096) == b""  # sent nothing, so nothing to reset
        assert time.monotonic() - started < 1.5


def test_stop_is_prompt_while_a_client_stalls_the_handshake(
    other_ca: CertificateAuthority,
) -> None:
    endpoint = ConfigEndpoint(tls=other_ca.server_context(["127.0.0.1"])).start()
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=TIMEOUT) as conn:
        # Wait until a handler thread holds the connection, waiting for a ClientHello.
        eventually(lambda: endpoint._connections, "the endpoint accepts", TIMEOUT)

        started = time.monotonic()
        endpoint.stop()
        assert time.monotonic() - started < 1.5  # far below HANDSHAKE_TIMEOUT

        assert conn.recv(4096) == b""


def test_endpoint_tls_must_be_a_context() -> None:
    with pytest.raises(TypeError, match="SSLContext"):
        ConfigEndpoint(tls=("cert.pem", "key.pem"))  # type: ignore[arg-type]


# memcached nodes


def test_every_node_serves_tls_under_its_hostname(tls_cluster: LocalCluster) -> None:
    for node in tls_cluster.nodes:
        assert_serves_tls(tls_cluster, node)


def test_node_certificate_names_the_hostname_only(tls_cluster: LocalCluster) -> None:
    node = tls_cluster.nodes[1]
    context = strict(tls_cluster.client_tls_context())

    certificate = peer_certificate(context, at(node), node.hostname)

    assert certificate["subjectAltName"] == (("DNS", node.hostname),)
    # Valid already for a while (a slightly late clock still accepts it), and for days.
    not_before = ssl.cert_time_to_seconds(certificate["notBefore"])
    not_after = ssl.cert_time_to_seconds(certificate["notAfter"])
    assert not_before < time.time() - 30 * 60
    assert not_after > time.time() + 24 * 60 * 60


@pytest.mark.parametrize(
    ("wrong", "verify_code"),
    [("other", HOSTNAME_MISMATCH), ("ip", IP_ADDRESS_MISMATCH), ("sibling", HOSTNAME_MISMATCH)],
)
def test_node_rejects_a_wrong_hostname(
    tls_cluster: LocalCluster, wrong: str, verify_code: int
) -> None:
    node, sibling = tls_cluster.nodes[0], tls_cluster.nodes[1]
    server_hostname = {
        "other": "local.abc123.9999.cache.local",
        "ip": node.ip,  # the certificate names the hostname, not the IP
        "sibling": sibling.hostname,
    }[wrong]
    context = strict(tls_cluster.client_tls_context())

    with pytest.raises(ssl.SSLCertVerificationError) as failure:
        tls_exchange(context, at(node), server_hostname, VERSION)

    assert failure.value.verify_code == verify_code


def test_another_ca_is_not_trusted(
    tls_cluster: LocalCluster, other_ca: CertificateAuthority
) -> None:
    node = tls_cluster.nodes[0]
    for context in (strict(other_ca.client_context()), ssl.create_default_context()):
        with pytest.raises(ssl.SSLCertVerificationError) as failure:
            tls_exchange(context, at(node), node.hostname, VERSION)
        assert failure.value.verify_code == UNKNOWN_ISSUER
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_exchange(context, local(tls_cluster.endpoint.port), "127.0.0.1", CONFIG_GET)


def test_plaintext_client_to_tls_node_fails_fast(tls_cluster: LocalCluster) -> None:
    for node in tls_cluster.nodes:
        assert_refused_plaintext(at(node))


def test_client_context_verifies_and_checks_hostnames(tls_cluster: LocalCluster) -> None:
    context = tls_cluster.client_tls_context()

    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_keys_per_node_speaks_tls(tls_cluster: LocalCluster) -> None:
    node = tls_cluster.nodes[2]
    context = strict(tls_cluster.client_tls_context())
    tls_exchange(context, at(node), node.hostname, b"set mine 0 0 1\r\nx\r\n")

    assert tls_cluster.keys_per_node(["mine"])[node.address] == 1


def test_readiness_probe_pins_the_node_certificate(other_ca: CertificateAuthority) -> None:
    certificate = other_ca.issue(["probe.cache.local"])
    with start_memcached(tls=certificate) as node:
        assert node.tls == certificate
        assert node.pid is not None
        own = cluster_module._PinnedTLS(certificate[0])
        foreign = cluster_module._PinnedTLS(other_ca.issue(["probe.cache.local"])[0])

        assert cluster_module._serves(node.ip, node.port, node.pid, own)
        assert not cluster_module._serves(node.ip, node.port, node.pid, foreign)
        assert not cluster_module._serves(node.ip, node.port, node.pid)  # plaintext


def test_tls_paths_with_a_comma_are_refused() -> None:
    with pytest.raises(ValueError, match="comma"):
        MemcachedNode(tls=("/tmp/a,b.pem", "/tmp/key.pem"))


# Topology changes


def test_replace_node_keeps_a_certificate_for_the_hostname(fresh_cluster: LocalCluster) -> None:
    old = fresh_cluster.nodes[0]

    new = fresh_cluster.replace_node(old)

    assert (new.hostname, new.port, fresh_cluster.config_version) == (old.hostname, old.port, 2)
    assert new.ip != old.ip
    assert_serves_tls(fresh_cluster, new)
    assert discover_over_tls(fresh_cluster) == (2, advertised(fresh_cluster.nodes))


def test_add_node_gets_a_certificate_for_its_hostname(fresh_cluster: LocalCluster) -> None:
    added = fresh_cluster.add_node()

    assert added.hostname == "local.abc123.0003.cache.local"
    assert_serves_tls(fresh_cluster, added)
    context = strict(fresh_cluster.client_tls_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_exchange(context, at(added), fresh_cluster.nodes[0].hostname, VERSION)
    assert discover_over_tls(fresh_cluster) == (2, advertised(fresh_cluster.nodes))


def test_restart_node_serves_tls_again(fresh_cluster: LocalCluster) -> None:
    node = fresh_cluster.nodes[1]

    fresh_cluster.restart_node(node)

    assert_serves_tls(fresh_cluster, node)


# Lifecycle


def test_stop_removes_the_ca_directory_and_every_process() -> None:
    before = set(memcached_children())  # the module's shared cluster may be running
    cluster = LocalCluster(nodes=2, tls=True).start()
    replaced = cluster.nodes[0]
    cluster.replace_node(replaced)
    cluster.add_node()
    ca = cluster.certificate_authority
    assert ca is not None
    directory = Path(ca.directory)
    certificate, key = cluster.nodes[0].tls or ("", "")
    assert Path(certificate).parent == Path(key).parent == directory
    pids = [node.pid for node in (replaced, *cluster.nodes)]
    assert set(memcached_children()) - before == set(pids[1:])

    cluster.stop()
    cluster.stop()  # idempotent

    assert not directory.exists()
    assert set(memcached_children()) <= before
    assert not any(pid is None or process_exists(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="cleaned up"):
        ca.issue(["late.cache.local"])


def test_plaintext_cluster_has_no_tls() -> None:
    cluster = LocalCluster(nodes=1)  # not started: nothing to stop

    assert cluster.tls is False
    assert cluster.certificate_authority is None
    assert cluster.endpoint.tls is None
    with pytest.raises(RuntimeError, match="tls=True"):
        cluster.client_tls_context()


def test_factory_fixture_passes_tls_through(
    elasticache_cluster_factory: ClusterFactory,
) -> None:
    cluster = elasticache_cluster_factory(nodes=1, tls=True)

    assert cluster.tls is True
    assert discover_over_tls(cluster) == (1, advertised(cluster.nodes))
    assert_serves_tls(cluster, cluster.nodes[0])


@requires_ipv6
def test_ipv6_tls_cluster() -> None:
    with LocalCluster(nodes=1, host="::1", tls=True) as cluster:
        context = strict(cluster.client_tls_context())
        node = cluster.nodes[0]
        with (
            socket.create_connection(("::1", cluster.endpoint.port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname="::1") as conn,
        ):
            conn.sendall(CONFIG_GET + QUIT)
            assert parse_config_reply(read_until_closed(conn)) == (1, advertised([node]))
        with (
            socket.create_connection(("::1", node.port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=node.hostname) as conn,
        ):
            conn.sendall(VERSION + QUIT)
            assert read_until_closed(conn) == b"VERSION 1.6.18\r\n"


# The certificate authority


WITHOUT_TRUSTME = """
import sys
sys.modules["trustme"] = None  # what an environment without trustme makes import see
from django_elasticache.testing import LocalCluster, start_memcached
with start_memcached() as node:
    print("plaintext", node.is_running)
for make in (lambda: LocalCluster(tls=True), lambda: LocalCluster(serverless=True)):
    try:
        make()
    except ImportError as missing:
        print("refused", missing)
try:
    from django_elasticache.testing import CertificateAuthority
except ImportError as missing:
    print("refused", missing)
"""


def test_without_trustme_plaintext_works_and_tls_says_how_to_install_it() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRUSTME],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    lines = result.stdout.splitlines()
    assert lines[0] == "plaintext True"
    assert len(lines) == 4
    for line in lines[1:]:
        assert line.startswith("refused ")
        assert "pip install django-elasticache[testing]" in line


@pytest.mark.parametrize("names", [[], "host.cache.local", ["bad name"], ["a/b"], ["x\n"]])
def test_issue_refuses_what_is_not_a_name(other_ca: CertificateAuthority, names: list) -> None:
    with pytest.raises(ValueError, match="name"):
        other_ca.issue(names)


def test_server_context_for_names_and_ip_literals(other_ca: CertificateAuthority) -> None:
    """One certificate can name hostnames, IPv4 and IPv6 literals; a long hostname, too
    long for a commonName, still goes in subjectAltName."""
    long_name = "n" * 60 + ".abc123.0001.cache.local"
    names = [long_name, "127.0.0.1", "::1", "localhost"]
    with ConfigEndpoint(tls=other_ca.server_context(names)) as endpoint:
        endpoint.publish([("a.cache.local", "127.0.0.1", 11211)], 4)
        context = strict(other_ca.client_context())
        for name in names:
            reply = tls_exchange(context, local(endpoint.port), name, VERSION)
            assert reply == b"VERSION 1.6.18\r\n"
        certificate = peer_certificate(context, local(endpoint.port), "localhost")
    assert certificate["subjectAltName"] == (
        ("DNS", long_name),
        ("IP Address", "127.0.0.1"),
        ("IP Address", "0:0:0:0:0:0:0:1"),
        ("DNS", "localhost"),
    )
