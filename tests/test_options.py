"""
LOCATION and OPTIONS rules (options.py): what is accepted, what each value becomes, and the
message a mistake gets, through the real backends wherever a backend applies the rule.
"""

from __future__ import annotations

import math
import ssl

import pytest
from django.core.cache import InvalidCacheBackendError

from django_elasticache import cli
from django_elasticache.cluster_utils import DEFAULT_TIMEOUT
from django_elasticache.cluster_utils import is_serverless_host as is_serverless
from django_elasticache.memcached import OPTION_RULES as PYLIBMC_RULES
from django_elasticache.options import (
    MAX_DISCOVERY_TIMEOUT,
    MAX_POOL_SIZE,
    MAX_REFRESH_INTERVAL,
    BackendOptions,
    Endpoint,
    parse_location,
    read_settings,
    split_options,
    system_tls_context,
)
from django_elasticache.pymemcache import OPTION_RULES as PYMEMCACHE_RULES

SERVERLESS = "my-cache-abc123.serverless.use1.cache.amazonaws.com"


@pytest.mark.parametrize(
    "location",
    [
        "cfg.example",
        "cfg.example:11211;other.example:11211",
        "cfg.example:11211,other.example:11211",
        "cfg.example;other.example:11211",
        "cfg.example,other.example:11211",
        ["a.example:11211", "b.example:11211"],
        "::1:11211",
        "cfg.example:0",
        "cfg.example:99999",
        "unix:/tmp/memcached.sock",
        "",
    ],
)
def test_location_must_be_one_host_and_port(location, make_cache) -> None:
    with pytest.raises(InvalidCacheBackendError, match="one configuration endpoint"):
        make_cache(location)


@pytest.mark.parametrize(
    ("location", "host", "port"),
    [
        ("cfg.example:11211", "cfg.example", 11211),
        ("10.0.0.1:11212", "10.0.0.1", 11212),
        ("[::1]:11213", "::1", 11213),
        ("[2001:db8::7]:1", "2001:db8::7", 1),
        (["cfg.example:65535"], "cfg.example", 65535),
    ],
)
def test_accepted_locations(location, host, port, make_cache) -> None:
    assert parse_location(location) == Endpoint(host=host, port=port)
    make_cache(location)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"IGNORE_CLUSTER_ERROR": True}, "Unknown ElastiCache option 'IGNORE_CLUSTER_ERROR'"),
        ({"IGNORE_CLUSTER_ERRORS": "yes"}, "must be True or False"),
        ({"IGNORE_EXCEPTIONS": 1}, "must be True or False"),
        ({"DISCOVERY_TIMEOUT": 0}, "DISCOVERY_TIMEOUT must be above 0"),
        ({"DISCOVERY_TIMEOUT": -1.5}, "DISCOVERY_TIMEOUT must be above 0"),
        ({"DISCOVERY_TIMEOUT": "2"}, "DISCOVERY_TIMEOUT must be a number of seconds, got '2'"),
        ({"DISCOVERY_TIMEOUT": True}, "DISCOVERY_TIMEOUT must be a number of seconds"),
        ({"DISCOVERY_TIMEOUT": math.inf}, "at most 3600 seconds, got inf"),
        ({"DISCOVERY_TIMEOUT": 1e300}, "at most 3600 seconds, got 1e[+]300"),
        ({"DISCOVERY_TIMEOUT": math.nan}, "at most 3600 seconds, got nan"),
        ({"DISCOVERY_TIMEOUT": 10**400}, "at most 3600 seconds"),
        ({"DISCOVERY_TIMEOUT": 3600.5}, "at most 3600 seconds, got 3600.5"),
        ({"REFRESH_INTERVAL": -1}, "REFRESH_INTERVAL must be above 0"),
        ({"REFRESH_INTERVAL": math.inf}, "REFRESH_INTERVAL must be above 0 and at most 86400"),
        ({"REFRESH_INTERVAL": -math.inf}, "REFRESH_INTERVAL must be above 0 and at most 86400"),
        ({"REFRESH_INTERVAL": math.nan}, "REFRESH_INTERVAL must be above 0 and at most 86400"),
        ({"REFRESH_INTERVAL": 86401}, "at most 86400 seconds, got 86401"),
        ({"REFRESH_INTERVAL": False}, "REFRESH_INTERVAL must be a number of seconds, got False"),
        ({"POOL_SIZE": 0}, "POOL_SIZE must be a whole number from 1 to 1024, got 0"),
        ({"POOL_SIZE": -3}, "POOL_SIZE must be a whole number from 1 to 1024, got -3"),
        ({"POOL_SIZE": 1025}, "POOL_SIZE must be a whole number from 1 to 1024, got 1025"),
        ({"POOL_SIZE": 8.0}, "POOL_SIZE must be a whole number from 1 to 1024, got 8.0"),
        ({"POOL_SIZE": "16"}, "POOL_SIZE must be a whole number from 1 to 1024, got '16'"),
        ({"POOL_SIZE": True}, "POOL_SIZE must be a whole number from 1 to 1024, got True"),
        ({"MAX_ENTRIES": 300}, "Unknown ElastiCache option 'MAX_ENTRIES' [(]the backend's"),
    ],
)
def test_bad_backend_options_are_refused(options, message, make_cache) -> None:
    with pytest.raises(InvalidCacheBackendError, match=message):
        make_cache("cfg.example:11211", **options)


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("ignore_exceptions", "IGNORE_EXCEPTIONS"),
        ("Refresh_Interval", "REFRESH_INTERVAL"),
        ("discovery_timeout", "DISCOVERY_TIMEOUT"),
        ("ignore_cluster_errors", "IGNORE_CLUSTER_ERRORS"),
        ("tls", "TLS"),
        ("pool_size", "POOL_SIZE"),
        ("IGNORE_CLUSTER_ERROR", "IGNORE_CLUSTER_ERRORS"),
        ("REFRESH_INTERVALS", "REFRESH_INTERVAL"),
    ],
)
def test_misspelt_backend_option_names_the_option_meant(name, meant, make_cache) -> None:
    """Passed on, a wrong-case name would reach the client library and fail at first use."""
    with pytest.raises(InvalidCacheBackendError, match=f"did you mean '{meant}'[?]"):
        make_cache("cfg.example:11211", **{name: True})


def test_client_library_options_pass_through_untouched() -> None:
    behaviors = {"tcp_nodelay": False}
    options = {"binary": True, "behaviors": behaviors, "timeout": 0.5, "POOL_SIZE": 4}
    backend, client = split_options(options)
    assert client == {"binary": True, "behaviors": behaviors, "timeout": 0.5}
    assert client["behaviors"] is behaviors
    assert backend.pool_size == 4
    assert options["POOL_SIZE"] == 4


def test_defaults_when_no_options_are_given(make_cache) -> None:
    options = make_cache("cfg.example:11211").backend_options
    assert options == BackendOptions()
    assert options.discovery_timeout == DEFAULT_TIMEOUT
    assert options.refresh_interval == 60.0
    assert options.pool_size == 16
    assert not options.ignore_exceptions and not options.ignore_cluster_errors
    assert options.tls is None


@pytest.mark.parametrize(
    ("options", "parsed"),
    [
        ({"DISCOVERY_TIMEOUT": 3}, {"discovery_timeout": 3.0}),
        ({"DISCOVERY_TIMEOUT": MAX_DISCOVERY_TIMEOUT}, {"discovery_timeout": 3600.0}),
        ({"DISCOVERY_TIMEOUT": 0.001}, {"discovery_timeout": 0.001}),
        ({"REFRESH_INTERVAL": MAX_REFRESH_INTERVAL}, {"refresh_interval": 86400.0}),
        ({"REFRESH_INTERVAL": 0.5}, {"refresh_interval": 0.5}),
        ({"REFRESH_INTERVAL": 0}, {"refresh_interval": None}),
        ({"REFRESH_INTERVAL": 0.0}, {"refresh_interval": None}),
        ({"REFRESH_INTERVAL": None}, {"refresh_interval": None}),
        ({"POOL_SIZE": 1}, {"pool_size": 1}),
        ({"POOL_SIZE": MAX_POOL_SIZE}, {"pool_size": 1024}),
        ({"IGNORE_EXCEPTIONS": True}, {"ignore_exceptions": True}),
    ],
)
def test_accepted_values_reach_the_backend(options, parsed, make_cache) -> None:
    backend_options = make_cache("cfg.example:11211", **options).backend_options
    assert backend_options == BackendOptions(**parsed)
    assert all(type(getattr(backend_options, name)) is type(v) for name, v in parsed.items())


def test_aliases_differing_beyond_discovery_share_its_settings(make_cache) -> None:
    """IGNORE_EXCEPTIONS and POOL_SIZE do not change how the node list is found."""
    plain = make_cache("cfg.example:11211").backend_options
    lenient = make_cache("cfg.example:11211", IGNORE_EXCEPTIONS=True, POOL_SIZE=2)
    assert lenient.backend_options != plain
    assert lenient.backend_options.discovery_settings == plain.discovery_settings
    assert hash(lenient.backend_options.discovery_settings) == hash(plain.discovery_settings)


@pytest.mark.parametrize(
    "options",
    [
        {"DISCOVERY_TIMEOUT": 1.0},
        {"REFRESH_INTERVAL": 30},
        {"REFRESH_INTERVAL": 0},
        {"IGNORE_CLUSTER_ERRORS": True},
        {"TLS": True},
        {"TLS": ssl.create_default_context()},
    ],
)
def test_each_discovery_option_makes_its_own_settings(options, make_pymemcache_cache) -> None:
    plain = make_pymemcache_cache("cfg.example:11211").backend_options.discovery_settings
    other = make_pymemcache_cache("cfg.example:11211", **options).backend_options
    assert other.discovery_settings != plain


def test_tls_true_is_one_context_per_process(make_pymemcache_cache) -> None:
    first = make_pymemcache_cache("cfg.example:11211", TLS=True).backend_options
    second = make_pymemcache_cache("cfg.example:11211", TLS=True).backend_options
    assert first.tls is second.tls is system_tls_context()
    assert first.tls.verify_mode == ssl.CERT_REQUIRED and first.tls.check_hostname
    assert first.discovery_settings == second.discovery_settings


@pytest.mark.parametrize("value", ["yes", 1, object()])
def test_tls_option_must_be_a_bool_or_a_context(make_pymemcache_cache, value) -> None:
    with pytest.raises(InvalidCacheBackendError, match="TLS must be True, False or"):
        make_pymemcache_cache("cfg.example:11211", TLS=value)


@pytest.mark.parametrize("managed", ["tls_context", "socket_module"])
def test_pymemcache_options_the_backend_manages_are_refused(
    make_pymemcache_cache, managed
) -> None:
    with pytest.raises(InvalidCacheBackendError, match="use OPTIONS\\['TLS'\\]"):
        make_pymemcache_cache("cfg.example:11211", **{managed: object()})


@pytest.mark.parametrize(
    "backend, options, named, accepted",
    [
        (
            "pymemcache",
            {"default_noreply": True},
            r"\['default_noreply'\]",
            {"default_noreply": False},
        ),
        ("pymemcache", {"ignore_exc": True}, r"\['ignore_exc'\]", {"ignore_exc": False}),
        (
            "pylibmc",
            {"behaviors": {"_noreply": 1}},
            r"\['behaviors'\]\['_noreply'\]",
            {"behaviors": {"_noreply": 0}},
        ),
    ],
)
def test_options_that_drop_replies_or_errors_are_refused_when_the_backend_is_built(
    make_pylibmc_cache, make_pymemcache_cache, backend, options, named, accepted
) -> None:
    """Refused at once, not at the first async call: the async methods cannot honour them."""
    make = make_pylibmc_cache if backend == "pylibmc" else make_pymemcache_cache
    with pytest.raises(InvalidCacheBackendError, match=named):
        make("cfg.example:11211", **options)
    make("cfg.example:11211", **accepted)


def test_pylibmc_backend_refuses_tls_and_names_the_pymemcache_backend(
    make_pylibmc_cache,
) -> None:
    with pytest.raises(InvalidCacheBackendError, match=r"django_elasticache\.pymemcache"):
        make_pylibmc_cache("cfg.example:11211", TLS=True)


@pytest.mark.parametrize("tls", [True, ssl.create_default_context()])
def test_pylibmc_rules_refuse_tls_with_the_rest(tls) -> None:
    with pytest.raises(InvalidCacheBackendError, match=r"pylibmc cannot speak TLS; .* BACKEND "):
        read_settings("cfg.example:11211", {"TLS": tls}, PYLIBMC_RULES)


def test_pylibmc_rules_refuse_a_serverless_endpoint_and_name_the_tls_backend() -> None:
    message = (
        f"'{SERVERLESS}' is an ElastiCache Serverless endpoint, which accepts only TLS, "
        "and pylibmc cannot speak TLS; use BACKEND 'django_elasticache.pymemcache.ElastiCache'"
    )
    with pytest.raises(InvalidCacheBackendError) as refused:
        read_settings(f"{SERVERLESS}:11211", {}, PYLIBMC_RULES)
    assert str(refused.value) == message


@pytest.mark.parametrize("managed", ["tls_context", "socket_module"])
def test_pymemcache_rules_refuse_client_options_the_backend_sets(managed) -> None:
    with pytest.raises(InvalidCacheBackendError, match=f"OPTIONS\\['{managed}'\\] is set by"):
        read_settings("cfg.example:11211", {"TLS": True, managed: None}, PYMEMCACHE_RULES)


def test_rules_apply_after_the_shared_checks() -> None:
    """One step: a bad LOCATION or option is reported even where a rule would refuse too."""
    with pytest.raises(InvalidCacheBackendError, match="one configuration endpoint"):
        read_settings(SERVERLESS, {"TLS": True}, PYLIBMC_RULES)
    with pytest.raises(InvalidCacheBackendError, match="did you mean 'TLS'"):
        read_settings(f"{SERVERLESS}:11211", {"tls": True}, PYLIBMC_RULES)


def test_settings_each_backend_accepts() -> None:
    tls = ssl.create_default_context()
    settings = read_settings(f"{SERVERLESS}:11211", {"TLS": tls, "timeout": 2}, PYMEMCACHE_RULES)
    assert settings.endpoint == Endpoint(SERVERLESS, 11211)
    assert settings.backend.tls is tls
    assert settings.client == {"timeout": 2}
    settings = read_settings("cfg.example:11211", {"binary": True}, PYLIBMC_RULES)
    assert settings.backend == BackendOptions() and settings.client == {"binary": True}


@pytest.mark.parametrize(
    ("host", "serverless"),
    [
        (SERVERLESS, True),
        (SERVERLESS.upper(), True),
        (SERVERLESS + ".", True),
        ("mycluster.abc123.cfg.use1.cache.amazonaws.com", False),
        ("serverless.use1.cache.amazonaws.com", False),
        (SERVERLESS + ".example.com", False),
        ("cache.serverless.example.com", False),
        ("10.0.0.1", False),
    ],
)
def test_serverless_endpoints_are_recognised_by_name(host, serverless) -> None:
    assert is_serverless(host) is serverless


@pytest.mark.parametrize(
    ("value", "message"),
    [("inf", "at most 3600, such as 2 or 0.5, got 'inf'"), ("nan", "got 'nan'"), ("0", "above 0")],
)
def test_cli_timeout_follows_the_discovery_timeout_rule(value, message, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["discover", "127.0.0.1:11211", "--timeout", value])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "argument --timeout: must be" in error and message in error
