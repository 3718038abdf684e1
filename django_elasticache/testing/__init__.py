"""Local stand-ins for an ElastiCache memcached cluster, for development and tests.

``LocalCluster`` runs real memcached processes behind an emulated configuration
endpoint; the pytest plugin in ``pytest_plugin`` hands them out as fixtures.
"""

from .cluster import LocalCluster, MemcachedNode, MemcachedNotFound, start_memcached
from .endpoint import ConfigEndpoint

__all__ = [
    "ConfigEndpoint",
    "LocalCluster",
    "MemcachedNode",
    "MemcachedNotFound",
    "start_memcached",
]
