"""Local stand-ins for an ElastiCache memcached cluster, for development and tests.

``LocalCluster`` runs real memcached processes behind an emulated configuration
endpoint, in plaintext or, with ``tls=True``, TLS only with certificates from a throwaway
``CertificateAuthority``; the pytest plugin in ``pytest_plugin`` hands them out as fixtures.
Each node has a loopback IP of its own and sits behind a relay (``relay.py``) that
answers discovery as ElastiCache nodes do; ``serverless=True`` emulates ElastiCache
Serverless instead. Every memcached dies with the process that started it
(``processes.py``).
"""

from .cluster import (
    LocalCluster,
    LoopbackAddresses,
    MemcachedNode,
    MemcachedNotFound,
    RelayedNode,
    start_memcached,
)
from .endpoint import ConfigEndpoint
from .tls import CertificateAuthority, OpenSSLNotFound

__all__ = [
    "CertificateAuthority",
    "ConfigEndpoint",
    "LocalCluster",
    "LoopbackAddresses",
    "MemcachedNode",
    "MemcachedNotFound",
    "OpenSSLNotFound",
    "RelayedNode",
    "start_memcached",
]
