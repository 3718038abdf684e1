"""
The error policy on both backends: server and connection errors become misses under
IGNORE_EXCEPTIONS and bring re-discovery forward; the caller's own mistakes (a value too
large, incr of a non-number) always raise, as the same error class with or without
IGNORE_EXCEPTIONS, and never make the backend ask for the node list again.
"""

from __future__ import annotations

import time

import pylibmc
import pytest
from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

from django_elasticache import topology

TOO_LARGE = b"x" * (2 << 20)  # memcached's default item size limit is 1 MiB

CALLER_ERRORS = {
    "pylibmc": {"too large": pylibmc.TooBig, "non-numeric": pylibmc.ClientError},
    "pymemcache": {"too large": MemcacheServerError, "non-numeric": MemcacheClientError},
}


@pytest.fixture
def instant_error_refresh(monkeypatch):
    """Any error that counts as the server's would start a refresh at once."""
    monkeypatch.setattr(topology, "ERROR_REFRESH_SPACING", 0.0)


def backend_name(cache) -> str:
    return "pylibmc" if type(cache).__module__.endswith("memcached") else "pymemcache"


def discoveries(cluster) -> int:
    time.sleep(0.2)  # a refresh, if one was wrongly started, runs in a background thread
    return cluster.endpoint.requests.count("version")


@pytest.mark.parametrize("ignore_exceptions", [False, True])
def test_caller_errors_raise_and_never_rediscover(
    elasticache_cluster, make_cache, ignore_exceptions, instant_error_refresh
) -> None:
    cache = make_cache(elasticache_cluster.location, IGNORE_EXCEPTIONS=ignore_exceptions)
    errors = CALLER_ERRORS[backend_name(cache)]
    cache.set("text", "not a number")
    before = discoveries(elasticache_cluster)
    with pytest.raises(errors["too large"]):
        cache.set("large", TOO_LARGE)
    with pytest.raises(errors["too large"]):
        cache.add("large", TOO_LARGE)
    with pytest.raises(errors["too large"]):
        cache.set_many({"large": TOO_LARGE})
    with pytest.raises(errors["non-numeric"]):
        cache.incr("text")
    assert cache.get("large") is None
    assert discoveries(elasticache_cluster) == before


def test_server_errors_rediscover_and_miss_under_ignore_exceptions(
    elasticache_cluster, make_cache, instant_error_refresh
) -> None:
    cache = make_cache(elasticache_cluster.location, IGNORE_EXCEPTIONS=True)
    keys = [f"k{index}" for index in range(30)]
    cache.set_many({key: key for key in keys})
    before = discoveries(elasticache_cluster)
    elasticache_cluster.kill_node(elasticache_cluster.nodes[0])
    found = {key: cache.get(key) for key in keys}
    missing = [key for key, value in found.items() if value is None]
    assert 0 < len(missing) < len(keys)
    assert all(found[key] == key for key in keys if key not in missing)
    assert discoveries(elasticache_cluster) > before
