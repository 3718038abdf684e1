from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from django.conf import settings
from support import memcached_children

from django_elasticache import memcached, pymemcache
from django_elasticache.topology import forget_all


def pytest_configure() -> None:
    # A SECRET_KEY as every project has one: Django 4.2's error mails (the ``mail_admins``
    # handler, on a signal receiver's error) read it.
    settings.configure(
        CACHES={}, INSTALLED_APPS=[], USE_TZ=True, SECRET_KEY="django-elasticache tests"
    )
    django.setup()


@pytest.fixture(autouse=True, scope="session")
def no_memcached_left_behind() -> Iterator[None]:
    """The run leaves no memcached process behind (module-scoped clusters included)."""
    yield
    assert memcached_children() == []


@pytest.fixture(autouse=True)
def fresh_topologies():
    """
    Every test discovers afresh: servers started by earlier tests are gone, and the OS may
    hand their ports to this test's endpoint.
    """
    yield
    forget_all()


BACKENDS = {"pylibmc": memcached.ElastiCache, "pymemcache": pymemcache.ElastiCache}

BackendFactory = Callable[..., Any]


def factory(backend_class: type) -> BackendFactory:
    """Build backends for a LOCATION as Django's cache handler builds them."""

    def make(location: str, key_prefix: str = "", **options: Any) -> Any:
        return backend_class(location, {"OPTIONS": options, "KEY_PREFIX": key_prefix})

    return make


@pytest.fixture(params=sorted(BACKENDS))
def make_cache(request: pytest.FixtureRequest) -> BackendFactory:
    """Each of the package's backends in turn: they promise the same behaviour."""
    return factory(BACKENDS[request.param])


@pytest.fixture
def make_pylibmc_cache() -> BackendFactory:
    return factory(memcached.ElastiCache)


@pytest.fixture
def make_pymemcache_cache() -> BackendFactory:
    return factory(pymemcache.ElastiCache)
