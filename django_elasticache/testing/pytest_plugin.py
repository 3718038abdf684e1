"""pytest fixtures that run a local ElastiCache-like memcached cluster.

The plugin is registered under the ``pytest11`` entry point, so installing
django-elasticache makes the fixtures available to every test suite. Point Django's cache
at a cluster with its ``location``, e.g. with pytest-django's ``settings`` fixture::

    def test_cache(elasticache_cluster, settings):
        settings.CACHES = {
            "default": {
                "BACKEND": "django_elasticache.memcached.ElastiCache",
                "LOCATION": elasticache_cluster.location,
            }
        }

``elasticache_cluster_factory(serverless=True)`` gives an ElastiCache Serverless
stand-in, ``relay=False`` nodes without the discovery relay (see ``LocalCluster``).
A run ended by a signal or a crash leaves no memcached behind: each dies with it.

The fixtures need the ``memcached`` binary (``apt-get install memcached`` on
Debian/Ubuntu, ``brew install memcached`` on macOS).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..topology import forget_all
from .cluster import LocalCluster

ClusterFactory = Callable[..., LocalCluster]


@pytest.fixture
def elasticache_cluster_factory() -> Iterator[ClusterFactory]:
    """Start clusters with LocalCluster's keyword arguments; all are stopped after the test.

    ``elasticache_cluster_factory(nodes=1, engine_version="1.4.10")`` returns a started
    cluster; use its ``location`` as the ``LOCATION`` of a
    ``django_elasticache.memcached.ElastiCache`` cache.
    """
    clusters: list[LocalCluster] = []

    def start_cluster(**options: Any) -> LocalCluster:
        cluster = LocalCluster(**options)
        clusters.append(cluster)
        return cluster.start()

    yield start_cluster
    for cluster in reversed(clusters):
        cluster.stop()
    # The OS may give a later cluster the same endpoint port; it must be discovered afresh.
    forget_all()


@pytest.fixture
def elasticache_cluster(elasticache_cluster_factory: ClusterFactory) -> LocalCluster:
    """A started three-node cluster, stopped after the test.

    Set ``CACHES["default"]["LOCATION"] = elasticache_cluster.location`` with
    ``"BACKEND": "django_elasticache.memcached.ElastiCache"`` to cache on it.
    """
    return elasticache_cluster_factory()
