"""
The contenders, each built against one cluster, and the calls a workload times.

Every contender is configured the way its documentation tells a user to, plus the same
one-second timeouts ours has, so that none is timed with a way of failing that the others
do not have (an unbounded wait saves a ``poll`` per call, but no one should run it). Stock
``PyLibMCCache`` gets our pylibmc behaviours: it is the baseline, so what is left between it
and ours is what this package adds, discovery and the node-list check on every call.

Builders import their library when called, so that a contender's library is needed only
where it runs.

The TLS contenders run on a ``LocalCluster(tls=True)``, whose certificates name each node's
hostname and come from a throwaway CA; their clear-text twins are the same builders on an
otherwise identical clear-text cluster, so that the cost of TLS is read side by side.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import django
from django.conf import settings

if not settings.configured:
    settings.configure()
    django.setup()

BASELINE = "stock"
"""Every ratio is against this contender: Django's PyLibMCCache with our behaviours."""

TIMEOUT_SECONDS = 1.0
"""Connect and reply timeout for the pymemcache contenders, as ours has (1000 ms)."""

DJANGO_TIMEOUT = 300
"""Django's default cache timeout, which the raw client passes itself."""

DJANGO_KEY_PREFIX = ":1:"
"""What Django's default key function puts before a key (empty KEY_PREFIX, VERSION 1)."""

Behaviors = Mapping[str, Any]


class Cluster(Protocol):
    """What a builder needs of a cluster: a ``LocalCluster``, or its addresses alone."""

    @property
    def location(self) -> str: ...

    @property
    def node_addresses(self) -> list[str]: ...


@dataclass(frozen=True)
class Addresses:
    """
    A cluster known by its addresses only, as a child process hands it over: ``hosts``
    maps each node's advertised hostname to its IP (what DNS would answer), and ``ca_pem``
    is the CA a TLS cluster's certificates come from (None: clear text).
    """

    location: str
    node_addresses: list[str]
    hosts: dict[str, str] = field(default_factory=dict)
    ca_pem: str | None = None

    @property
    def tls(self) -> bool:
        return self.ca_pem is not None

    def spec(self) -> dict[str, Any]:
        """The addresses as JSON, for another process."""
        return {
            "location": self.location,
            "node_addresses": list(self.node_addresses),
            "hosts": dict(self.hosts),
            "ca_pem": self.ca_pem,
        }


def addresses(cluster: Any) -> Addresses:
    """A ``LocalCluster`` as ``Addresses``; ``Addresses`` as they are."""
    if isinstance(cluster, Addresses):
        return cluster
    authority = cluster.certificate_authority
    return Addresses(
        cluster.location,
        cluster.node_addresses,
        {node.hostname: node.ip for node in cluster.nodes},
        None if authority is None else authority.ca_pem,
    )


def tls_context(cluster: Addresses) -> ssl.SSLContext:
    """What a client of the cluster is configured with: trust in its CA alone, hostnames
    checked (``LocalCluster.client_tls_context`` does the same)."""
    if cluster.ca_pem is None:
        raise ValueError(f"the cluster at {cluster.location} does not use TLS")
    return ssl.create_default_context(cadata=cluster.ca_pem)


class ListedHosts:
    """
    A socket module for pymemcache that resolves the nodes' hostnames to their IPs, as DNS
    does for a real cluster: django-elastipymemcache over TLS must connect to a node by the
    hostname its certificate names, and a local cluster's hostnames resolve nowhere.
    """

    def __init__(self, hosts: Mapping[str, str]) -> None:
        self._hosts = dict(hosts)

    def getaddrinfo(self, host: str, port: int, *args: Any) -> list[tuple]:
        return socket.getaddrinfo(self._hosts.get(host, host), port, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


@dataclass(frozen=True)
class Calls:
    """
    The calls a workload makes, bound once to one contender so that the timed loop only
    calls them. ``key`` turns a workload's key into the one the contender is given: itself
    for a Django backend; for the raw client the finished Django key, as a caller with
    precomputed keys would pass it.
    """

    get: Callable[..., Any]
    set: Callable[[str, Any], Any]
    get_many: Callable[[list[str]], Mapping[str, Any]]
    set_many: Callable[[dict[str, Any]], Any]
    incr: Callable[[str], Any]
    delete: Callable[[str], Any]
    delete_many: Callable[[list[str]], Any]
    key: Callable[[str], str]


def django_calls(cache: Any) -> Calls:
    """The public cache API, so that whatever the backend overrides is what gets timed."""
    return Calls(
        get=cache.get,
        set=cache.set,
        get_many=cache.get_many,
        set_many=cache.set_many,
        incr=cache.incr,
        delete=cache.delete,
        delete_many=cache.delete_many,
        key=str,
    )


def raw_calls(client: Any) -> Calls:
    """pylibmc itself: the floor for any Django backend built on pylibmc."""
    return Calls(
        get=client.get,
        set=functools.partial(client.set, time=DJANGO_TIMEOUT),
        get_many=client.get_multi,
        set_many=functools.partial(client.set_multi, time=DJANGO_TIMEOUT),
        incr=client.incr,
        delete=client.delete,
        delete_many=client.delete_multi,
        key=DJANGO_KEY_PREFIX.__add__,
    )


def our_behaviors() -> dict[str, Any]:
    from django_elasticache.memcached import DEFAULT_BEHAVIORS

    return dict(DEFAULT_BEHAVIORS)


def static_location(cluster: Cluster) -> str:
    """The node list as a stock backend's LOCATION: it cannot discover the nodes."""
    return ";".join(cluster.node_addresses)


def build_ours(cluster: Cluster, behaviors: Behaviors, /, **options: Any) -> Any:
    """Ours with its own defaults and ``options``; ``behaviors`` is for the others."""
    from django_elasticache.memcached import ElastiCache

    return ElastiCache(cluster.location, {"OPTIONS": options})


def build_ours_pymemcache(cluster: Cluster, behaviors: Behaviors) -> Any:
    """Our pymemcache backend with its own defaults, TLS if the cluster has it."""
    from django_elasticache.pymemcache import ElastiCache

    cluster = addresses(cluster)
    options = {"TLS": tls_context(cluster)} if cluster.tls else {}
    return ElastiCache(cluster.location, {"OPTIONS": options})


def build_stock(cluster: Cluster, behaviors: Behaviors) -> Any:
    from django.core.cache.backends.memcached import PyLibMCCache

    return PyLibMCCache(static_location(cluster), {"OPTIONS": {"behaviors": dict(behaviors)}})


def build_pymemcache(cluster: Cluster, behaviors: Behaviors) -> Any:
    from django.core.cache.backends.memcached import PyMemcacheCache

    options = {"connect_timeout": TIMEOUT_SECONDS, "timeout": TIMEOUT_SECONDS}
    return PyMemcacheCache(static_location(cluster), {"OPTIONS": options})


def build_elastipymemcache(cluster: Cluster, behaviors: Behaviors) -> Any:
    from django_elastipymemcache.backend import ElastiPymemcache

    return ElastiPymemcache(cluster.location, {"OPTIONS": elastipymemcache_options(cluster)})


def elastipymemcache_options(cluster: Cluster) -> dict[str, Any]:
    """Its README's auto-discovery setup, refreshing every 60 s as ours does by default."""
    where = addresses(cluster)
    options: dict[str, Any] = {
        "ignore_exc": True,
        "discovery_interval": 60.0,
        "connect_timeout": TIMEOUT_SECONDS,
        "timeout": TIMEOUT_SECONDS,
    }
    if where.tls:
        options.update(elastipymemcache_tls_options(where))
    return options


def elastipymemcache_tls_options(cluster: Addresses) -> dict[str, Any]:
    """
    TLS for django-elastipymemcache, which has no TLS option of its own: its OPTIONS go to
    pymemcache's ``HashClient``, whose ``tls_context`` reaches every node's client and the
    endpoint's. By default it connects to a node's IP, which the node's certificate does
    not name; ``use_vpc_ip_address`` False connects by hostname, which ``ListedHosts``
    resolves as DNS would.
    """
    return {
        "tls_context": tls_context(cluster),
        "use_vpc_ip_address": False,
        "socket_module": ListedHosts(cluster.hosts),
    }


def build_raw(cluster: Cluster, behaviors: Behaviors) -> Any:
    import pylibmc

    return pylibmc.Client(cluster.node_addresses, behaviors=dict(behaviors))


@dataclass(frozen=True)
class Contender:
    """One way of using the cluster from Django."""

    name: str
    label: str
    builder: Callable[[Cluster, Behaviors], Any]
    raw: bool = False
    tls: bool = False
    """Built on a TLS cluster (the builder sees that the cluster has TLS, and uses it)."""

    def build(self, cluster: Cluster, behaviors: Behaviors | None = None) -> Any:
        return self.builder(cluster, our_behaviors() if behaviors is None else behaviors)

    def calls(self, target: Any) -> Calls:
        return raw_calls(target) if self.raw else django_calls(target)


CONTENDERS: tuple[Contender, ...] = (
    Contender("ours", "ElastiCache (ours)", build_ours),
    Contender("ours_pymemcache", "pymemcache ElastiCache (ours)", build_ours_pymemcache),
    Contender(BASELINE, "PyLibMCCache, our behaviours", build_stock),
    Contender("pymemcache", "PyMemcacheCache", build_pymemcache),
    Contender("elastipymemcache", "django-elastipymemcache", build_elastipymemcache),
    Contender("raw", "raw pylibmc.Client", build_raw, raw=True),
)
"""All contenders on the clear-text clusters, in table order."""

TLS_CONTENDERS: tuple[Contender, ...] = (
    Contender(
        "ours_pymemcache_tls",
        "pymemcache ElastiCache (ours), TLS",
        build_ours_pymemcache,
        tls=True,
    ),
    Contender(
        "ours_pymemcache", "pymemcache ElastiCache (ours), clear text", build_ours_pymemcache
    ),
    Contender(
        "elastipymemcache_tls", "django-elastipymemcache, TLS", build_elastipymemcache, tls=True
    ),
    Contender("elastipymemcache", "django-elastipymemcache, clear text", build_elastipymemcache),
)
"""The contenders of the TLS comparison, each TLS one followed by its clear-text twin."""

TLS_PAIRS = {"ours_pymemcache_tls": "ours_pymemcache", "elastipymemcache_tls": "elastipymemcache"}
"""Each TLS contender and its clear-text twin, the same builder on a clear-text cluster."""

BY_NAME = {contender.name: contender for contender in (*TLS_CONTENDERS, *CONTENDERS)}
"""Every contender by name; a TLS contender's builder is its clear-text twin's."""
