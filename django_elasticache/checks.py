"""
System checks for the caches that use this package's backends.

A wrong LOCATION or OPTIONS otherwise surfaces at the first request that touches the cache,
in production; ``manage.py check`` finds it before that, without touching the network.
The checks are registered when ``"django_elasticache"`` is in INSTALLED_APPS (see
``apps.py``); the backends work without it.

Django's own cache checks build every cache, and a backend refuses invalid settings when
it is built, so a plain ``check`` stops at the first invalid cache with a traceback. The
checks here are also tagged ``elasticache``: ``manage.py check --tag elasticache`` runs them
alone and reports every problem of every cache as a message.

The checks that do reach the clusters are deployment checks tagged ``elasticache_network``:
``manage.py check --deploy --tag elasticache_network`` runs them alone, ``check --deploy``
with the others. Never a plain ``check``, ``runserver`` or ``migrate``: on every supported
Django, deployment checks are the ones that run only when asked for (Django 4.2 and 5.2 run
``database``-tagged checks in a plain ``check`` too). Their findings are warnings;
``--fail-level WARNING`` makes them fail the command.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.cache.backends.base import InvalidCacheBackendError

from .cluster_utils import is_serverless_host
from .health import BACKENDS, Status, check
from .options import Endpoint, parse_location, split_options

__all__ = [
    "NETWORK_TAG",
    "SETTINGS_TAG",
    "check_cache_settings",
    "check_clusters",
    "check_deployment",
]

SETTINGS_TAG = "elasticache"
NETWORK_TAG = "elasticache_network"

PYLIBMC_BACKEND, PYMEMCACHE_BACKEND = BACKENDS

_AWS_NAME = re.compile(r".+\.cache\.amazonaws\.com(?:\.cn)?\.?", re.IGNORECASE)
_CONFIG_ENDPOINT = re.compile(r"\.cfg\.", re.IGNORECASE)

_TLS_BACKEND_HINT = (
    f"Use BACKEND '{PYMEMCACHE_BACKEND}' (pip install django-elasticache[pymemcache]) "
    "with OPTIONS['TLS'] = True."
)
_SERVERLESS_HINT = (
    f"A serverless cache speaks only TLS: use BACKEND '{PYMEMCACHE_BACKEND}' with "
    "OPTIONS {'TLS': True}; the backend knows it has no auto discovery."
)


def _our_caches() -> Iterator[tuple[str, Mapping[str, Any]]]:
    for alias, cache in settings.CACHES.items():
        if cache.get("BACKEND") in BACKENDS:
            yield alias, cache


@checks.register(SETTINGS_TAG, checks.Tags.caches)
def check_cache_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """LOCATION and OPTIONS of every cache on our backends, as the backend will read them."""
    messages: list[checks.CheckMessage] = []
    for alias, cache in _our_caches():
        messages += _settings_messages(alias, cache)
    return messages


@checks.register(SETTINGS_TAG, checks.Tags.caches, deploy=True)
def check_deployment(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Settings that are fine in development and a hidden outage in production."""
    messages: list[checks.CheckMessage] = []
    for alias, cache in _our_caches():
        options = cache.get("OPTIONS") or {}
        if options.get("IGNORE_CLUSTER_ERRORS") is True:
            messages.append(
                checks.Warning(
                    f"CACHES[{alias!r}] sets IGNORE_CLUSTER_ERRORS: when discovery fails, "
                    "the backend caches on the configuration endpoint alone, as one node, "
                    "without an error.",
                    hint="Leave it to development against a plain memcached; in production "
                    "a failed discovery should be seen.",
                    id="django_elasticache.W101",
                )
            )
    return messages


@checks.register(NETWORK_TAG, deploy=True)
def check_clusters(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Discover every cluster and reach each of its nodes, within DISCOVERY_TIMEOUT."""
    messages: list[checks.CheckMessage] = []
    for alias, cache in _our_caches():
        if _settings_messages(alias, cache):
            continue  # Already reported by check_cache_settings.
        health = check(alias)
        if health.status in _NETWORK_FINDINGS:
            finding, hint, check_id = _NETWORK_FINDINGS[health.status]
            messages.append(
                checks.Warning(
                    f"CACHES[{alias!r}]: the cluster at {health.endpoint} {finding}: "
                    + "; ".join(health.problems),
                    hint=hint,
                    id=check_id,
                )
            )
    return messages


_NETWORK_FINDINGS = {
    Status.UNREACHABLE: (
        "cannot be used",
        "Check LOCATION, the network path (security groups) and TLS; "
        "`manage.py elasticache` shows every node.",
        "django_elasticache.W201",
    ),
    Status.DEGRADED: (
        "is degraded",
        "Keys on a node that does not answer fail or miss until the node is back or "
        "replaced; `manage.py elasticache` shows every node.",
        "django_elasticache.W202",
    ),
}
"""What the network check says of a cluster in each unhealthy state: text, hint, ID."""


def _settings_messages(alias: str, cache: Mapping[str, Any]) -> list[checks.CheckMessage]:
    where = f"CACHES[{alias!r}]"
    messages: list[checks.CheckMessage] = []
    endpoint = None
    try:
        endpoint = parse_location(cache.get("LOCATION"))
    except InvalidCacheBackendError as exc:
        messages.append(
            checks.Error(
                f"{where}: {exc}.",
                hint="Set LOCATION to the cluster's configuration endpoint, such as "
                "'mycluster.abc123.cfg.use1.cache.amazonaws.com:11211'.",
                id="django_elasticache.E001",
            )
        )
    options = cache.get("OPTIONS") or {}
    try:
        backend_options, client_options = split_options(options)
    except InvalidCacheBackendError as exc:
        messages.append(
            checks.Error(
                f"{where}: {exc}.",
                hint="Upper-case OPTIONS belong to the backend (see its documentation); "
                "lower-case ones go to the client library unchanged.",
                id="django_elasticache.E002",
            )
        )
        return messages
    pylibmc = cache["BACKEND"] == PYLIBMC_BACKEND
    if pylibmc and backend_options.tls is not None:
        messages.append(
            checks.Error(
                f"{where}: OPTIONS['TLS'] is set, but pylibmc cannot speak TLS.",
                hint=_TLS_BACKEND_HINT,
                id="django_elasticache.E003",
            )
        )
    if not pylibmc:
        messages += _pymemcache_messages(where, client_options)
    if endpoint is not None:
        messages += _endpoint_messages(where, endpoint, pylibmc, options)
    if backend_options.refresh_interval is None:
        messages.append(
            checks.Warning(
                f"{where}: REFRESH_INTERVAL is {options['REFRESH_INTERVAL']!r}, so the node "
                "list is discovered once per process and never refreshed.",
                hint="Nodes that ElastiCache adds, removes or replaces are then not followed "
                "until a restart; leave REFRESH_INTERVAL unset (60 s) or give seconds.",
                id="django_elasticache.W002",
            )
        )
    return messages


def _pymemcache_messages(
    where: str, client_options: Mapping[str, Any]
) -> list[checks.CheckMessage]:
    """Client options the pymemcache backend sets itself, and pymemcache being installed."""
    try:
        pymemcache = importlib.import_module(PYMEMCACHE_BACKEND.rpartition(".")[0])
    except ImportError as exc:
        return [
            checks.Error(
                f"{where}: the pymemcache backend cannot be imported: {exc}.",
                hint="pip install django-elasticache[pymemcache]",
                id="django_elasticache.E007",
            )
        ]
    return [
        checks.Error(
            f"{where}: OPTIONS[{name!r}] is set by the backend for every node.",
            hint="The backend pools, places and retries itself (see POOL_SIZE); use "
            "OPTIONS['TLS'] (True or an ssl.SSLContext) for encryption.",
            id="django_elasticache.E004",
        )
        for name in pymemcache.MANAGED_BY_THE_BACKEND
        if name in client_options
    ]


def _endpoint_messages(
    where: str, endpoint: Endpoint, pylibmc: bool, options: Mapping[str, Any]
) -> list[checks.CheckMessage]:
    """What the LOCATION's host name tells about the kind of ElastiCache endpoint."""
    if is_serverless_host(endpoint.host):
        if pylibmc:
            return [
                checks.Error(
                    f"{where}: {endpoint.host} is an ElastiCache Serverless endpoint, "
                    "which pylibmc cannot reach (TLS only).",
                    hint=_SERVERLESS_HINT,
                    id="django_elasticache.E005",
                )
            ]
        if not options.get("TLS"):
            return [
                checks.Error(
                    f"{where}: {endpoint.host} is an ElastiCache Serverless endpoint, "
                    "which accepts only TLS, and OPTIONS lack TLS.",
                    hint=_SERVERLESS_HINT,
                    id="django_elasticache.E006",
                )
            ]
        return []
    if _AWS_NAME.fullmatch(endpoint.host) and not _CONFIG_ENDPOINT.search(endpoint.host):
        return [
            checks.Warning(
                f"{where}: {endpoint.host} looks like one ElastiCache node, not the "
                "cluster's configuration endpoint (which has '.cfg.' in its name).",
                hint="Discovery through a node works, but the node may be removed or "
                "replaced; AWS recommends the configuration endpoint for auto discovery.",
                id="django_elasticache.W001",
            )
        ]
    return []
