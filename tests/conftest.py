from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import django
import pytest
import uvloop
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


class EventLoop:
    """An event loop implementation, run as an application server runs it."""

    def __init__(
        self,
        run: Callable[[Coroutine[Any, Any, Any]], Any],
        new: Callable[[], asyncio.AbstractEventLoop],
        closes_its_transports: bool,
    ) -> None:
        self.run = run
        """Run a coroutine on a new loop of this kind, closed after it as ``asyncio.run`` does."""
        self.new = new
        """A new loop of this kind, for a test that runs and closes it itself."""
        self.closes_its_transports = closes_its_transports
        """Whether ``close()`` closes the loop's connections (uvloop's) or leaves them open."""


EVENT_LOOPS = {
    "asyncio": EventLoop(asyncio.run, asyncio.new_event_loop, closes_its_transports=False),
    # uvicorn's loop wherever uvloop is installed (``uvicorn[standard]`` installs it).
    "uvloop": EventLoop(uvloop.run, uvloop.new_event_loop, closes_its_transports=True),
}


@pytest.fixture(params=sorted(EVENT_LOOPS))
def event_loop_kind(request: pytest.FixtureRequest) -> EventLoop:
    """asyncio's own event loop and uvloop's in turn: the async path promises the same on both."""
    return EVENT_LOOPS[request.param]
