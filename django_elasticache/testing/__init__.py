"""Local stand-ins for an ElastiCache memcached cluster, for development and tests.

``LocalCluster`` runs real memcached processes behind an emulated configuration
endpoint, in plaintext or, with ``tls=True``, TLS only with certificates from a throwaway
``CertificateAuthority``; the pytest plugin in ``pytest_plugin`` hands them out as fixtures.
"""

from .cluster import LocalCluster, MemcachedNode, MemcachedNotFound, start_memcached
from .endpoint import ConfigEndpoint
from .tls import CertificateAuthority, OpenSSLNotFound

__all__ = [
    "CertificateAuthority",
    "ConfigEndpoint",
    "LocalCluster",
    "MemcachedNode",
    "MemcachedNotFound",
    "OpenSSLNotFound",
    "start_memcached",
]
