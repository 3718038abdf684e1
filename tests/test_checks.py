"""System checks: each message for the setting that causes it, without a network."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from django.core import checks
from django.test import override_settings

from django_elasticache.checks import (
    NETWORK_TAG,
    SETTINGS_TAG,
    check_cache_settings,
    check_clusters,
    check_deployment,
)

PYLIBMC = "django_elasticache.memcached.ElastiCache"
PYMEMCACHE = "django_elasticache.pymemcache.ElastiCache"
CONFIG_ENDPOINT = "mycluster.abc123.cfg.use1.cache.amazonaws.com:11211"
SERVERLESS = "mycache-abc123.serverless.use1.cache.amazonaws.com:11211"


def cache(backend: str = PYLIBMC, location: Any = CONFIG_ENDPOINT, **options: Any) -> dict:
    return {"BACKEND": backend, "LOCATION": location, "OPTIONS": options}


def ids(messages: list[checks.CheckMessage]) -> list[str]:
    return [message.id for message in messages]


def settings_messages(**caches: dict) -> list[checks.CheckMessage]:
    with override_settings(CACHES=caches):
        return check_cache_settings()


def test_a_good_cache_and_other_backends_give_no_message() -> None:
    local = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    assert settings_messages(default=cache(), tls=cache(PYMEMCACHE, TLS=True), local=local) == []


@pytest.mark.parametrize("location", ["not-a-location", "a:1;b:2", ["a:1", "b:2"], None])
def test_an_invalid_location_is_e001_naming_it(location: Any) -> None:
    [message] = settings_messages(broken=cache(location=location))
    assert message.id == "django_elasticache.E001" and message.level == checks.ERROR
    assert "CACHES['broken']" in message.msg and repr(location) in message.msg
    assert "configuration endpoint" in message.hint


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"REFRESH_INTERVALL": 30}, "'REFRESH_INTERVALL'"),
        ({"DISCOVERY_TIMEOUT": -1}, "DISCOVERY_TIMEOUT"),
        ({"IGNORE_EXCEPTIONS": "yes"}, "IGNORE_EXCEPTIONS"),
        ({"TLS": "on"}, "TLS"),
    ],
)
def test_invalid_options_are_e002_naming_the_option(options: dict, named: str) -> None:
    [message] = settings_messages(default=cache(**options))
    assert message.id == "django_elasticache.E002" and named in message.msg
    assert message.hint


def test_tls_on_the_pylibmc_backend_is_e003_naming_the_pymemcache_backend() -> None:
    [message] = settings_messages(default=cache(TLS=True))
    assert message.id == "django_elasticache.E003" and PYMEMCACHE in message.hint


def test_tls_context_given_to_the_pymemcache_backend_is_e004() -> None:
    messages = settings_messages(default=cache(PYMEMCACHE, tls_context=None, socket_module=None))
    assert ids(messages) == ["django_elasticache.E004"] * 2
    assert "'tls_context'" in messages[0].msg and "'socket_module'" in messages[1].msg


def test_pooling_options_given_to_the_pymemcache_backend_are_e004() -> None:
    messages = settings_messages(default=cache(PYMEMCACHE, use_pooling=True, hasher=None))
    assert ids(messages) == ["django_elasticache.E004"] * 2
    assert "'use_pooling'" in messages[0].msg and "'hasher'" in messages[1].msg


def test_a_serverless_endpoint_on_the_pylibmc_backend_is_e005() -> None:
    [message] = settings_messages(default=cache(location=SERVERLESS))
    assert message.id == "django_elasticache.E005" and "Serverless" in message.msg


def test_a_serverless_endpoint_needs_tls() -> None:
    [message] = settings_messages(default=cache(PYMEMCACHE, SERVERLESS))
    assert message.id == "django_elasticache.E006"
    assert message.msg.endswith("OPTIONS lack TLS.")
    assert settings_messages(default=cache(PYMEMCACHE, SERVERLESS, TLS=True)) == []


@pytest.mark.parametrize(
    "host",
    [
        "mycluster.abc123.0001.use1.cache.amazonaws.com",
        "mycluster.abc123.0002.cnn1.cache.amazonaws.com.cn",
    ],
)
def test_a_node_endpoint_is_w001(host: str) -> None:
    [message] = settings_messages(default=cache(location=f"{host}:11211"))
    assert message.id == "django_elasticache.W001" and message.level == checks.WARNING
    assert host in message.msg and ".cfg." in message.msg


@pytest.mark.parametrize("interval", [0, None])
def test_refresh_interval_off_is_w002(interval: Any) -> None:
    [message] = settings_messages(default=cache(REFRESH_INTERVAL=interval))
    assert message.id == "django_elasticache.W002" and repr(interval) in message.msg


def test_ignore_cluster_errors_is_w101_only_in_the_deploy_check() -> None:
    with override_settings(CACHES={"default": cache(IGNORE_CLUSTER_ERRORS=True)}):
        assert check_cache_settings() == []
        [message] = check_deployment()
        assert message.id == "django_elasticache.W101"
        assert checks.run_checks(tags=[SETTINGS_TAG]) == []
        assert ids(checks.run_checks(tags=[SETTINGS_TAG], include_deployment_checks=True)) == [
            "django_elasticache.W101"
        ]
    serverless = cache(PYMEMCACHE, SERVERLESS, TLS=True)
    with override_settings(CACHES={"default": serverless}):
        assert check_deployment() == []  # a serverless cache needs no IGNORE_CLUSTER_ERRORS


def test_network_checks_run_only_when_named(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=2)
    cluster.endpoint.stop()
    with override_settings(CACHES={"default": cache(location=cluster.location)}):
        default_run = checks.run_checks()
        named_run = checks.run_checks(tags=[NETWORK_TAG], include_deployment_checks=True)
    assert "django_elasticache.W201" not in ids(default_run)
    assert ids(named_run) == ["django_elasticache.W201"]
    assert cluster.location in named_run[0].msg and "cannot connect" in named_run[0].msg


def test_network_check_reports_a_node_down_and_passes_when_all_answer(
    elasticache_cluster_factory,
) -> None:
    cluster = elasticache_cluster_factory(nodes=3)
    settings = {"default": cache(location=cluster.location, DISCOVERY_TIMEOUT=2)}
    with override_settings(CACHES=settings):
        assert check_clusters() == []
        down = cluster.nodes[2]
        cluster.kill_node(down)
        [message] = check_clusters()
    assert message.id == "django_elasticache.W202" and down.address in message.msg


def test_the_pymemcache_backend_without_pymemcache_is_e007(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pymemcache", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "django_elasticache.pymemcache")
    [message] = settings_messages(default=cache(PYMEMCACHE))
    assert message.id == "django_elasticache.E007"
    assert message.hint == "pip install django-elasticache[pymemcache]"
