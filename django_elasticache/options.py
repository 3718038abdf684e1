"""
What a user writes in ``CACHES``, checked once when the backend is built.

These rules are the same for every backend of this package, whatever client library it
drives: LOCATION is one configuration endpoint, and the upper-case OPTIONS belong to the
backend while every other option is the client library's, passed through untouched.
"""

from __future__ import annotations

import functools
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.core.cache.backends.base import InvalidCacheBackendError

from .cluster_utils import DEFAULT_TIMEOUT

__all__ = [
    "BackendOptions",
    "Endpoint",
    "parse_location",
    "split_options",
    "system_tls_context",
]

_HOST_PORT = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:/\[\];,]+)):(?P<port>\d+)")


@dataclass(frozen=True)
class Endpoint:
    """The configuration endpoint a LOCATION names."""

    host: str
    port: int


@dataclass(frozen=True)
class BackendOptions:
    """
    The backend's own options, with their defaults.

    ``discovery_timeout`` bounds one discovery; ``refresh_interval`` is how often the node
    list is asked again (``None``: discover once per process); ``ignore_cluster_errors``
    falls back to LOCATION as the only node when discovery fails; ``ignore_exceptions``
    turns server errors into cache misses; ``tls`` encrypts every connection, to the
    endpoint and to the nodes (``None``: clear text).
    """

    ignore_cluster_errors: bool = False
    discovery_timeout: float = DEFAULT_TIMEOUT
    refresh_interval: float | None = 60.0
    ignore_exceptions: bool = False
    tls: ssl.SSLContext | None = None
    pool_size: int = 16


_OPTION_NAMES = {
    "IGNORE_CLUSTER_ERRORS": "ignore_cluster_errors",
    "DISCOVERY_TIMEOUT": "discovery_timeout",
    "REFRESH_INTERVAL": "refresh_interval",
    "IGNORE_EXCEPTIONS": "ignore_exceptions",
    "TLS": "tls",
}


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
    it is almost always a misspelt backend option.
    """
    backend: dict[str, Any] = {}
    client: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if name in _OPTION_NAMES:
            backend[_OPTION_NAMES[name]] = value
        elif isinstance(name, str) and name.isupper():
            raise InvalidCacheBackendError(
                f"Unknown ElastiCache option {name!r}; the backend's options are "
                f"{', '.join(sorted(_OPTION_NAMES))}"
            )
        else:
            client[name] = value
    for name in ("ignore_cluster_errors", "ignore_exceptions"):
        if name in backend and not isinstance(backend[name], bool):
            raise InvalidCacheBackendError(
                f"ElastiCache option {name.upper()} must be True or False, got {backend[name]!r}"
            )
    if "discovery_timeout" in backend:
        backend["discovery_timeout"] = _positive_seconds(
            "DISCOVERY_TIMEOUT", backend["discovery_timeout"]
        )
    if "refresh_interval" in backend:
        interval = backend["refresh_interval"]
        backend["refresh_interval"] = (
            None if interval in (None, 0) else _positive_seconds("REFRESH_INTERVAL", interval)
        )
    if "tls" in backend:
        backend["tls"] = _tls_context(backend["tls"])
    return BackendOptions(**backend), client


@functools.cache
def system_tls_context() -> ssl.SSLContext:
    """
    The context ``TLS: True`` means: the system's trust store, certificates and hostnames
    verified. One per process, so that every thread's backend shares one topology.
    """
    return ssl.create_default_context()


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


def _positive_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidCacheBackendError(
            f"ElastiCache option {name} must be a positive number of seconds, got {value!r}"
        )
    return float(value)
