"""
Django's memcached cache tests, aimed at this package's backends on a LocalCluster.

Django's ``tests/cache/tests.py`` enables ``PyLibMCCacheTests`` and ``PyMemcacheCacheTests``
only when settings.CACHES holds a cache whose BACKEND is the stock dotted path, and builds
their CACHES overrides from that cache when the module is imported. Our settings configure
no such cache, so those overrides lack BACKEND and LOCATION and the classes are skipped.
Each class here subclasses one of Django's, un-skips it and adds our BACKEND and the
cluster's LOCATION to every CACHES override Django's class and its test methods carry;
every test body stays Django's own.

Only TestCase subclasses defined here may live in this module's namespace: the runner
loads every test class it finds in it. Django's classes are reached through ``django_tests``.
"""

from __future__ import annotations

import inspect
import os
import unittest
from collections.abc import Callable
from typing import Any, ClassVar

from cache import tests as django_tests
from django.conf import settings
from django.core.cache import caches
from django.test.utils import override_settings

LOCATION_VARIABLE = "DJANGOTESTS_LOCATION"

LOCATION = os.environ.get(LOCATION_VARIABLE, "")
"""The LocalCluster's configuration endpoint, started by run.py."""

if not LOCATION:
    raise RuntimeError(f"{LOCATION_VARIABLE} is not set; run these tests with djangotests/run.py")

EXCLUDED: dict[str, str] = {
    "test_location_multiple_servers": (
        "asserts a LOCATION of several servers becomes the server list; ours must be exactly "
        "one configuration endpoint, and a list raises InvalidCacheBackendError by design"
    ),
    "test_pylibmc_client_servers": (
        "expects client_servers to echo a static LOCATION (socket paths, hosts without port); "
        "ours are the nodes the endpoint lists"
    ),
}
"""Django tests that do not apply to a backend whose servers come from discovery."""

SKIPPED_BY_DJANGO: dict[str, str] = {
    name: "Django skips it for every memcached backend: memcached does its own culling"
    for name in ("test_cull", "test_cull_delete_when_store_empty", "test_zero_cull")
}
"""The skips Django's tests make themselves for any memcached backend; any other skip fails."""


def _with_cluster(aliases: dict[str, dict[str, Any]], backend: str) -> dict[str, dict[str, Any]]:
    """Django's CACHES for a test, each alias served by ``backend`` on the cluster."""
    return {
        alias: {**params, "BACKEND": backend, "LOCATION": LOCATION}
        for alias, params in aliases.items()
    }


def _settings_override(test: Callable[..., Any]) -> override_settings | None:
    """
    The ``@override_settings`` a Django test method is decorated with, if any. Django's
    decorator keeps the original in ``__wrapped__`` and itself in the wrapper's closure.
    """
    if not hasattr(test, "__wrapped__"):
        return None
    decorator = inspect.getclosurevars(test).nonlocals.get("self")
    return decorator if isinstance(decorator, override_settings) else None


def _retarget_method_overrides(cls: type[unittest.TestCase], backend: str) -> None:
    """Re-decorate each test method whose own CACHES override Django built without a BACKEND."""
    for name in unittest.TestLoader().getTestCaseNames(cls):
        test = getattr(cls, name)
        decorator = _settings_override(test)
        if decorator is None or "CACHES" not in decorator.options:
            continue
        options = {**decorator.options}
        options["CACHES"] = _with_cluster(options["CACHES"], backend)
        setattr(cls, name, override_settings(**options)(test.__wrapped__))


def _exclude_inapplicable(cls: type[unittest.TestCase]) -> None:
    """Skip the EXCLUDED tests, visibly, with their reason."""
    for name, reason in EXCLUDED.items():
        if hasattr(cls, name):
            setattr(cls, name, unittest.skip(f"excluded: {reason}")(getattr(cls, name)))


def on_cluster(backend: str) -> Callable[[type], type]:
    """
    Class decorator: run the decorated subclass of a Django memcached test class against
    ``backend`` on the LocalCluster, in place of the stock backend Django looks for.
    """

    def decorate(cls: type) -> type:
        # Django's skipUnless found no stock backend configured; its reason would also
        # replace the reason of each test skipped below.
        cls.__unittest_skip__ = False
        cls.__unittest_skip_why__ = ""
        cls.base_params = {"BACKEND": backend, "LOCATION": LOCATION}
        _retarget_method_overrides(cls, backend)
        _exclude_inapplicable(cls)
        return override_settings(
            CACHES=_with_cluster(cls._overridden_settings["CACHES"], backend)
        )(cls)

    return decorate


class BackendCheck:
    """
    Before every test, check that each cache it can reach is our backend: a mistake in
    retargeting Django's settings must fail loudly, not pass against the stock backend.
    """

    base_params: ClassVar[dict[str, str]]

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        for alias in settings.CACHES:
            backend = type(caches[alias])
            if f"{backend.__module__}.{backend.__qualname__}" != self.base_params["BACKEND"]:
                raise AssertionError(f"cache {alias!r} is {backend}, not our backend")


@on_cluster("django_elasticache.memcached.ElastiCache")
class PyLibMCElastiCacheTests(BackendCheck, django_tests.PyLibMCCacheTests):
    """Django's PyLibMCCacheTests, against ``django_elasticache.memcached.ElastiCache``."""


@on_cluster("django_elasticache.pymemcache.ElastiCache")
class PyMemcacheElastiCacheTests(BackendCheck, django_tests.PyMemcacheCacheTests):
    """
    Django's PyMemcacheCacheTests, against ``django_elasticache.pymemcache.ElastiCache``.
    Its ``test_close`` then checks that closing keeps the connections: ours pools them
    across requests, where Django's backend disconnects after each one.
    """

    should_disconnect_on_close = False
