"""
The contenders, each built against one cluster, and the calls a workload times.

Every contender is configured the way its documentation tells a user to, plus the same
one-second timeouts ours has, so that none is timed with a way of failing that the others
do not have (an unbounded wait saves a ``poll`` per call, but no one should run it). Stock
``PyLibMCCache`` gets our pylibmc behaviours: it is the baseline, so what is left between it
and ours is what this package adds, discovery and the node-list check on every call.

Builders import their library when called, so that a memory probe of one contender loads
only that contender's code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
    """A cluster known by its addresses only, as a probe subprocess receives it."""

    location: str
    node_addresses: list[str]


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


def build_stock(cluster: Cluster, behaviors: Behaviors) -> Any:
    from django.core.cache.backends.memcached import PyLibMCCache

    return PyLibMCCache(static_location(cluster), {"OPTIONS": {"behaviors": dict(behaviors)}})


def build_stock_defaults(cluster: Cluster, behaviors: Behaviors) -> Any:
    from django.core.cache.backends.memcached import PyLibMCCache

    return PyLibMCCache(static_location(cluster), {"OPTIONS": {}})


def build_pymemcache(cluster: Cluster, behaviors: Behaviors) -> Any:
    from django.core.cache.backends.memcached import PyMemcacheCache

    options = {"connect_timeout": TIMEOUT_SECONDS, "timeout": TIMEOUT_SECONDS}
    return PyMemcacheCache(static_location(cluster), {"OPTIONS": options})


def build_elastipymemcache(cluster: Cluster, behaviors: Behaviors) -> Any:
    """Its README's auto-discovery setup, refreshing every 60 s as ours does by default."""
    from django_elastipymemcache.backend import ElastiPymemcache

    options = {
        "ignore_exc": True,
        "discovery_interval": 60.0,
        "connect_timeout": TIMEOUT_SECONDS,
        "timeout": TIMEOUT_SECONDS,
    }
    return ElastiPymemcache(cluster.location, {"OPTIONS": options})


def build_raw(cluster: Cluster, behaviors: Behaviors) -> Any:
    import pylibmc

    return pylibmc.Client(cluster.node_addresses, behaviors=dict(behaviors))


@dataclass(frozen=True)
class Contender:
    """One way of using the cluster from Django; ``module`` is the one its builder imports."""

    name: str
    label: str
    builder: Callable[[Cluster, Behaviors], Any]
    module: str
    raw: bool = False

    def build(self, cluster: Cluster, behaviors: Behaviors | None = None) -> Any:
        return self.builder(cluster, our_behaviors() if behaviors is None else behaviors)

    def calls(self, target: Any) -> Calls:
        return raw_calls(target) if self.raw else django_calls(target)


DJANGO_MEMCACHED = "django.core.cache.backends.memcached"

CONTENDERS: tuple[Contender, ...] = (
    Contender("ours", "ElastiCache (ours)", build_ours, "django_elasticache.memcached"),
    Contender(BASELINE, "PyLibMCCache, our behaviours", build_stock, DJANGO_MEMCACHED),
    Contender(
        "stock_defaults",
        "PyLibMCCache, default behaviours",
        build_stock_defaults,
        DJANGO_MEMCACHED,
    ),
    Contender("pymemcache", "PyMemcacheCache", build_pymemcache, DJANGO_MEMCACHED),
    Contender(
        "elastipymemcache",
        "django-elastipymemcache",
        build_elastipymemcache,
        "django_elastipymemcache.backend",
    ),
    Contender("raw", "raw pylibmc.Client", build_raw, "pylibmc", raw=True),
)
"""All contenders, in table order."""

BY_NAME = {contender.name: contender for contender in CONTENDERS}
