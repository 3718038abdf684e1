"""In-transit encryption: the pymemcache backend on a TLS-only LocalCluster."""

from __future__ import annotations

import ssl
import time

import pytest

from django_elasticache.cluster_utils import EndpointTLSError, WrongProtocolData, discover
from django_elasticache.testing import start_memcached
from django_elasticache.testing.tls import CertificateAuthority

TIMEOUT = 1.0
UPPER_BOUND = 5.0


@pytest.fixture
def tls_cluster(elasticache_cluster_factory):
    return elasticache_cluster_factory(nodes=3, tls=True)


def endpoint_of(cluster) -> tuple[str, int]:
    return cluster.endpoint.host, cluster.endpoint.port


def test_discovery_over_tls(tls_cluster) -> None:
    config = discover(*endpoint_of(tls_cluster), TIMEOUT, tls_cluster.client_tls_context())
    assert list(config.addresses) == tls_cluster.node_addresses
    assert [node.hostname for node in config.nodes] == [n.hostname for n in tls_cluster.nodes]


def test_round_trip_over_tls_across_every_node(tls_cluster, make_pymemcache_cache) -> None:
    cache = make_pymemcache_cache(tls_cluster.location, TLS=tls_cluster.client_tls_context())
    data = {f"k{index}": f"value-{index}" for index in range(300)}
    assert cache.set_many(data) == []
    assert cache.get_many(list(data)) == data
    assert cache.add("counter", 1) is True
    assert cache.incr("counter", 5) == 6
    held = tls_cluster.keys_per_node([cache.make_key(key) for key in data])
    assert all(held.values()) and sum(held.values()) == len(data)


def test_wrong_ca_fails_discovery_clearly(tls_cluster, make_pymemcache_cache) -> None:
    with CertificateAuthority() as other:
        cache = make_pymemcache_cache(tls_cluster.location, TLS=other.client_context())
        with pytest.raises(EndpointTLSError, match="certificate verification failed"):
            cache.get("key")


def test_node_certificate_for_another_hostname_is_refused(
    tls_cluster, make_pymemcache_cache
) -> None:
    """The node is reached at its listed IP, but must prove the listed hostname."""
    certificate = tls_cluster.certificate_authority.issue(["someone-else.cache.local"])
    with start_memcached(tls=certificate, hostname="impostor.cache.local") as impostor:
        tls_cluster.publish([impostor], version=tls_cluster.config_version + 1)
        cache = make_pymemcache_cache(tls_cluster.location, TLS=tls_cluster.client_tls_context())
        with pytest.raises(ssl.SSLCertVerificationError, match=r"impostor\.cache\.local"):
            cache.set("key", "value")


def test_clear_text_client_against_tls_cluster_fails_fast_and_says_why(
    tls_cluster, make_cache
) -> None:
    cache = make_cache(tls_cluster.location, DISCOVERY_TIMEOUT=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(WrongProtocolData, match=r"clear-text clients: set OPTIONS\['TLS'\]"):
        cache.get("key")
    assert time.monotonic() - started < UPPER_BOUND


def test_tls_client_against_clear_text_endpoint_fails_clearly(
    elasticache_cluster, make_pymemcache_cache
) -> None:
    with CertificateAuthority() as authority:
        cache = make_pymemcache_cache(
            elasticache_cluster.location,
            TLS=authority.client_context(),
            DISCOVERY_TIMEOUT=TIMEOUT,
        )
        started = time.monotonic()
        with pytest.raises(EndpointTLSError, match="TLS handshake failed"):
            cache.get("key")
        assert time.monotonic() - started < UPPER_BOUND


def test_tls_true_uses_the_system_trust_store(tls_cluster, make_pymemcache_cache) -> None:
    """The throwaway CA is in no system store, so TLS=True must refuse this cluster."""
    cache = make_pymemcache_cache(tls_cluster.location, TLS=True)
    with pytest.raises(EndpointTLSError, match="certificate verification failed"):
        cache.get("key")


def test_ignore_cluster_errors_never_falls_back_to_clear_text(
    tls_cluster, make_pymemcache_cache
) -> None:
    with CertificateAuthority() as other:
        cache = make_pymemcache_cache(
            tls_cluster.location, TLS=other.client_context(), IGNORE_CLUSTER_ERRORS=True
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            cache.set("key", "value")


def test_set_many_of_kilobyte_values_over_tls(
    elasticache_cluster_factory, make_pymemcache_cache
) -> None:
    """memcached stalls on several TLS-carried commands in one write; set_many must not."""
    cluster = elasticache_cluster_factory(nodes=1, tls=True)
    cache = make_pymemcache_cache(cluster.location, TLS=cluster.client_tls_context())
    data = {f"k{index}": "x" * 2000 for index in range(10)}
    assert cache.set_many(data) == []
    assert cache.get_many(list(data)) == data
