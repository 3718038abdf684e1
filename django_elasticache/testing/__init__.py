"""Local stand-ins for an ElastiCache memcached cluster, for development and tests.

``LocalCluster`` runs real memcached processes behind an emulated configuration
endpoint, in plaintext or, with ``tls=True``, TLS only with certificates from a throwaway
``CertificateAuthority``; the pytest plugin in ``pytest_plugin`` hands them out as fixtures.
Each node has a loopback IP of its own and sits behind a relay (``relay.py``) that
answers discovery as ElastiCache nodes do; ``serverless=True`` emulates ElastiCache
Serverless instead. Every memcached dies with the process that started it
(``processes.py``).

The TLS part needs trustme (``pip install django-elasticache[testing]``); it is imported
only when used, so plaintext clusters work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cluster import (
    LocalCluster,
    LoopbackAddresses,
    MemcachedNode,
    MemcachedNotFound,
    RelayedNode,
    start_memcached,
)
from .endpoint import ConfigEndpoint

if TYPE_CHECKING:
    from .tls import CertificateAuthority

__all__ = [
    "CertificateAuthority",
    "ConfigEndpoint",
    "LocalCluster",
    "LoopbackAddresses",
    "MemcachedNode",
    "MemcachedNotFound",
    "RelayedNode",
    "start_memcached",
]


def __getattr__(name: str) -> Any:
    """Import CertificateAuthority on first use: it needs trustme, plaintext clusters do not."""
    if name == "CertificateAuthority":
        from .tls import CertificateAuthority

        return CertificateAuthority
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
