"""
What a user writes in ``CACHES``, checked once when the backend is built.

Most rules are the same for every backend of this package, whatever client library it
drives: LOCATION is one configuration endpoint, and the upper-case OPTIONS belong to the
backend while every other option is the client library's, passed through untouched. What a
backend cannot take on top of that (TLS without a TLS-capable library, client keywords it
sets itself) is its ``BackendRules``. ``read_settings`` applies both in one step that builds
nothing, so a refused setting never leaves a node list, a thread or a connection behind.
"""

from __future__ import annotations

import difflib
import functools
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.core.cache.backends.base import InvalidCacheBackendError

from .cluster_utils import DEFAULT_TIMEOUT, is_serverless_host

__all__ = [
    "DEFAULT_COMPRESS_MIN_LENGTH",
    "DEFAULT_POOL_SIZE",
    "MAX_DISCOVERY_TIMEOUT",
    "MAX_POOL_SIZE",
    "MAX_REFRESH_INTERVAL",
    "TLS_BACKEND",
    "BackendOptions",
    "BackendRules",
    "CacheSettings",
    "DiscoverySettings",
    "Endpoint",
    "check_seconds",
    "parse_location",
    "read_settings",
    "split_options",
    "system_tls_context",
]

MAX_DISCOVERY_TIMEOUT = 3600.0
"""An hour: a discovery that may take longer is a typo, and would hold up the first request."""

MAX_REFRESH_INTERVAL = 86400.0
"""A day; to discover once per process and never again, REFRESH_INTERVAL is 0 or None."""

DEFAULT_POOL_SIZE = 16
MAX_POOL_SIZE = 1024
"""More idle clients than this per node only hold connections memcached would rather drop."""

DEFAULT_COMPRESS_MIN_LENGTH = 0
"""
Off, though compression pays for values of a few KB (``benchmarks/compression.py``: a 20 KB
HTML fragment shrinks by 90%, a 5 KB JSON response by 80%, a pickled list of 200 dicts by
60%), for two reasons. Turning it on changes what is stored: processes still running a
release without it, or Django's own ``PyMemcacheCache``, cannot read compressed values
(pymemcache's ``pickle_serde`` reads a compressed pickle as None, compressed bytes as they
are, compressed text as ``UnicodeDecodeError``); plain pylibmc reads them. And it trades CPU
for memory on every store: each ``zlib.compress`` costs about 50 us before its first byte,
and 170-360 us for the values above, as much as a round trip to a node; only the user knows
whether the cluster is short of memory or the web servers of CPU. 1024 is a good value
when on: smaller values save a few hundred bytes at most for the same fixed cost.
"""

TLS_BACKEND = "django_elasticache.pymemcache.ElastiCache"

_HOST_PORT = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:/\[\];,]+)):(?P<port>\d+)")


@dataclass(frozen=True)
class Endpoint:
    """The configuration endpoint a LOCATION names."""

    host: str
    port: int


@dataclass(frozen=True)
class DiscoverySettings:
    """
    Everything discovery and refresh depend on besides the endpoint. Backends of one endpoint
    with equal settings can share one node list, whatever else their OPTIONS say: two
    aliases differing only in IGNORE_EXCEPTIONS see the same cluster.
    """

    ignore_cluster_errors: bool
    discovery_timeout: float
    refresh_interval: float | None
    tls: ssl.SSLContext | None


@dataclass(frozen=True)
class BackendOptions:
    """
    The backend's own options, with their defaults.

    ``discovery_timeout`` bounds one discovery; ``refresh_interval`` is how often the node
    list is asked again (``None``: discover once per process); ``ignore_cluster_errors``
    falls back to LOCATION as the only node when discovery fails; ``ignore_exceptions``
    turns server errors into cache misses; ``tls`` encrypts every connection, to the
    endpoint and to the nodes (``None``: clear text); ``pool_size`` is how many idle
    clients the process keeps per node.

    ``compress_min_length``: values whose serialized form has at least this many bytes are
    stored zlib-compressed (0: never), as pylibmc and pymemcache mark compressed values, so
    plain clients of either library read them back (see ``compression``).
    """

    ignore_cluster_errors: bool = False
    discovery_timeout: float = DEFAULT_TIMEOUT
    refresh_interval: float | None = 60.0
    ignore_exceptions: bool = False
    tls: ssl.SSLContext | None = None
    pool_size: int = DEFAULT_POOL_SIZE
    compress_min_length: int = DEFAULT_COMPRESS_MIN_LENGTH

    @property
    def discovery_settings(self) -> DiscoverySettings:
        """What a process-wide node list is keyed by, with the endpoint."""
        return DiscoverySettings(
            ignore_cluster_errors=self.ignore_cluster_errors,
            discovery_timeout=self.discovery_timeout,
            refresh_interval=self.refresh_interval,
            tls=self.tls,
        )


_OPTION_NAMES = {
    "IGNORE_CLUSTER_ERRORS": "ignore_cluster_errors",
    "DISCOVERY_TIMEOUT": "discovery_timeout",
    "REFRESH_INTERVAL": "refresh_interval",
    "IGNORE_EXCEPTIONS": "ignore_exceptions",
    "TLS": "tls",
    "POOL_SIZE": "pool_size",
    "COMPRESS_MIN_LENGTH": "compress_min_length",
}


@dataclass(frozen=True)
class BackendRules:
    """
    What one backend cannot take, on top of the rules every backend shares.

    ``library`` names the client library in messages; ``speaks_tls`` says whether it can
    encrypt (without TLS neither the ``TLS`` option nor a serverless cache, which accepts
    nothing else, can work); ``managed_client_options`` are client keywords the backend
    sets for every node itself, so a user's value would be overridden;
    ``reply_dropping_options`` are the paths into the client options of settings that make
    the library skip replies or hide errors, which the async methods cannot honour (they
    wait for every reply and raise every error): refused when the backend is built rather
    than at its first async call.
    """

    library: str
    speaks_tls: bool
    managed_client_options: frozenset[str] = frozenset()
    reply_dropping_options: tuple[tuple[str, ...], ...] = ()

    def check(
        self, endpoint: Endpoint, options: BackendOptions, client: Mapping[str, Any]
    ) -> None:
        """Raise ``InvalidCacheBackendError`` for the first setting this backend refuses."""
        if not self.speaks_tls and options.tls is not None:
            raise InvalidCacheBackendError(
                f"{self.library} cannot speak TLS; for a cluster with in-transit encryption "
                f"use BACKEND {TLS_BACKEND!r}"
            )
        if not self.speaks_tls and is_serverless_host(endpoint.host):
            raise InvalidCacheBackendError(
                f"{endpoint.host!r} is an ElastiCache Serverless endpoint, which accepts only "
                f"TLS, and {self.library} cannot speak TLS; use BACKEND {TLS_BACKEND!r}"
            )
        for path in self.reply_dropping_options:
            value: Any = client
            for name in path:
                value = value.get(name) if isinstance(value, Mapping) else None
            if value:
                where = "".join(f"[{name!r}]" for name in path)
                raise InvalidCacheBackendError(
                    f"OPTIONS{where}={value!r} is not supported: the cache methods, async "
                    "ones included, wait for every reply and raise every error"
                )
        managed = sorted(self.managed_client_options.intersection(client))
        if managed:
            raise InvalidCacheBackendError(
                f"OPTIONS[{managed[0]!r}] is set by the backend for every node (it pools, "
                "places and retries itself; see POOL_SIZE); use OPTIONS['TLS'] (True or an "
                "ssl.SSLContext) for encryption"
            )


@dataclass(frozen=True)
class CacheSettings:
    """One cache alias's LOCATION and OPTIONS, checked: see ``read_settings``."""

    endpoint: Endpoint
    backend: BackendOptions
    client: dict[str, Any]


def read_settings(
    location: object, options: Mapping[str, Any] | None, rules: BackendRules
) -> CacheSettings:
    """
    Check a cache alias's LOCATION and OPTIONS for the backend ``rules`` describe, all in
    one step that builds nothing, so that a refused setting leaves no node list, thread or
    connection behind. ``client`` holds the options for the client library.
    """
    endpoint = parse_location(location)
    backend, client = split_options(options)
    rules.check(endpoint, backend, client)
    return CacheSettings(endpoint=endpoint, backend=backend, client=client)


def parse_location(location: object) -> Endpoint:
    """
    Read the one ``host:port`` of the configuration endpoint from LOCATION.

    A list or a ``;``/``,``-separated string is refused rather than half-used: the node
    list comes from discovery, so a second address would be silently ignored.
    """
    if isinstance(location, (list, tuple)) and len(location) == 1:
        location = location[0]
    match = _HOST_PORT.fullmatch(location) if isinstance(location, str) else None
    port = int(match["port"]) if match else 0
    if match is None or not 0 < port < 65536:
        raise InvalidCacheBackendError(
            f"ElastiCache LOCATION must be one configuration endpoint as 'host:port' "
            f"(a hostname, an IPv4 address or '[IPv6]:port'), got {location!r}"
        )
    return Endpoint(host=match["ipv6"] or match["host"], port=port)


def split_options(options: Mapping[str, Any] | None) -> tuple[BackendOptions, dict[str, Any]]:
    """
    Separate the backend's options from the client library's, validating the former.

    Returns the backend options and a new dict of the remaining client options; the user's
    mapping is not modified. An unknown upper-case name is an error, not a client keyword:
    it is almost always a misspelt backend option. So is a backend option in another case,
    which the client library would only refuse at the first cache call.
    """
    backend: dict[str, Any] = {}
    client: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if name in _OPTION_NAMES:
            backend[_OPTION_NAMES[name]] = value
        elif isinstance(name, str) and (name.isupper() or name.upper() in _OPTION_NAMES):
            raise InvalidCacheBackendError(_unknown_option_message(name))
        else:
            client[name] = value
    for name in ("ignore_cluster_errors", "ignore_exceptions"):
        if name in backend and not isinstance(backend[name], bool):
            raise InvalidCacheBackendError(
                f"ElastiCache option {name.upper()} must be True or False, got {backend[name]!r}"
            )
    if "discovery_timeout" in backend:
        backend["discovery_timeout"] = _option_seconds(
            "DISCOVERY_TIMEOUT", backend["discovery_timeout"], MAX_DISCOVERY_TIMEOUT
        )
    if "refresh_interval" in backend:
        interval = backend["refresh_interval"]
        # 0 or None: never again. (False == 0 too, but a bool is no interval: refused.)
        backend["refresh_interval"] = (
            None
            if interval is None or (type(interval) in (int, float) and interval == 0)
            else _option_seconds("REFRESH_INTERVAL", interval, MAX_REFRESH_INTERVAL)
        )
    if "tls" in backend:
        backend["tls"] = _tls_context(backend["tls"])
    if "pool_size" in backend:
        backend["pool_size"] = _pool_size(backend["pool_size"])
    if "compress_min_length" in backend:
        backend["compress_min_length"] = _compress_min_length(backend["compress_min_length"])
    return BackendOptions(**backend), client


def check_seconds(value: object, at_most: float) -> float:
    """
    ``value`` as a duration in seconds: a number above 0 and at most ``at_most``, so never
    infinite or NaN (either would fail every later timer or socket call, not here).
    Raises ``ValueError`` saying what is wrong without naming the setting.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of seconds, got {value!r}")
    if not 0 < value <= at_most:  # NaN fails both comparisons
        raise ValueError(f"must be above 0 and at most {at_most:g} seconds, got {value!r}")
    return float(value)


@functools.cache
def system_tls_context() -> ssl.SSLContext:
    """
    The context ``TLS: True`` means: the system's trust store, certificates and hostnames
    verified. One per process, so that every thread's backend shares one topology.
    """
    return ssl.create_default_context()


def _unknown_option_message(name: str) -> str:
    guess = name.upper() if name.upper() in _OPTION_NAMES else None
    guess = guess or next(iter(difflib.get_close_matches(name.upper(), _OPTION_NAMES, 1)), None)
    hint = f"; did you mean {guess!r}?" if guess else ""
    return (
        f"Unknown ElastiCache option {name!r}{hint} (the backend's options, upper-case, are "
        f"{', '.join(sorted(_OPTION_NAMES))}; the client library's are lower-case)"
    )


def _option_seconds(name: str, value: object, at_most: float) -> float:
    try:
        return check_seconds(value, at_most)
    except ValueError as exc:
        raise InvalidCacheBackendError(f"ElastiCache option {name} {exc}") from None


def _pool_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_POOL_SIZE:
        raise InvalidCacheBackendError(
            f"ElastiCache option POOL_SIZE must be a whole number from 1 to {MAX_POOL_SIZE}, "
            f"got {value!r}"
        )
    return value


def _compress_min_length(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidCacheBackendError(
            "ElastiCache option COMPRESS_MIN_LENGTH must be a whole number of bytes, 0 or more "
            f"(0 or None: never compress), got {value!r}"
        )
    return value


def _tls_context(value: object) -> ssl.SSLContext | None:
    if isinstance(value, ssl.SSLContext):
        return value
    if value is True:
        return system_tls_context()
    if value is False or value is None:
        return None
    raise InvalidCacheBackendError(
        f"ElastiCache option TLS must be True, False or an ssl.SSLContext, got {value!r}"
    )
