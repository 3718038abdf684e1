"""
The backends on ElastiCache Serverless for memcached, emulated by
``LocalCluster(serverless=True)``: one TLS endpoint that answers ``config get cluster``
with ``ERROR``, refuses a delayed ``flush_all`` and multi-key requests over 16 KB. The
pymemcache backend with TLS serves it as one node, with no warning and no refresh,
splitting large ``get_many`` calls.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from django_elasticache.pymemcache import ElastiCache

# 600 keys of about 200 characters: a single get line would be over 120 KB.
KEYS = [f"{index:04d}-" + "k" * 195 for index in range(600)]


@pytest.fixture
def serverless(elasticache_cluster_factory):
    return elasticache_cluster_factory(serverless=True)


def backend(cluster, **options) -> ElastiCache:
    options = {"TLS": cluster.client_tls_context(), **options}
    return ElastiCache(cluster.location, {"OPTIONS": options})


def test_serves_as_one_node_without_warning_or_refresh(serverless, caplog) -> None:
    caplog.set_level(logging.INFO, logger="django_elasticache")
    cache = backend(serverless, REFRESH_INTERVAL=0.1)
    cache.set("key", "value")
    config = cache._topology.current()
    assert config.serverless and len(config.nodes) == 1
    time.sleep(0.3)
    assert cache.get("key") == "value"
    assert cache._topology.current() is config  # never refreshed
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_large_get_many_is_split_below_the_request_limit(serverless) -> None:
    cache = backend(serverless)
    cache.set_many({key: key[:4] for key in KEYS})
    assert cache.get_many(KEYS) == {key: key[:4] for key in KEYS}

    async def read() -> dict[str, str]:
        return await cache.aget_many(KEYS)

    assert asyncio.run(read()) == {key: key[:4] for key in KEYS}


def test_clear_empties_the_cache(serverless) -> None:
    cache = backend(serverless)
    cache.set_many({"a": 1, "b": 2})
    cache.clear()
    assert cache.get_many(["a", "b"]) == {}
    cache.set("a", 1)
    asyncio.run(cache.aclear())
    assert cache.get("a") is None
