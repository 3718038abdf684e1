from __future__ import annotations

from collections.abc import Callable
from typing import Any

import django
import pytest
from django.conf import settings

from django_elasticache.memcached import ElastiCache


def pytest_configure() -> None:
    settings.configure(CACHES={}, INSTALLED_APPS=[], USE_TZ=True)
    django.setup()


BackendFactory = Callable[..., ElastiCache]


@pytest.fixture
def make_cache() -> BackendFactory:
    """An ElastiCache backend for a LOCATION, built as Django's cache handler builds it."""

    def make(location: str, key_prefix: str = "", **options: Any) -> ElastiCache:
        return ElastiCache(location, {"OPTIONS": options, "KEY_PREFIX": key_prefix})

    return make
