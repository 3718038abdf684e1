"""``manage.py check`` and ``manage.py elasticache`` run as a user runs them, on a real project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).parent / "project"
TIMEOUT = 60


def manage(location: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "ELASTICACHE_LOCATION": location, **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_check_passes_a_good_cache_without_touching_the_network() -> None:
    result = manage("127.0.0.1:1", "check")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_check_warns_about_a_node_endpoint_and_refresh_off() -> None:
    result = manage(
        "mycluster.abc123.0001.use1.cache.amazonaws.com:11211",
        "check",
        ELASTICACHE_OPTIONS='{"REFRESH_INTERVAL": 0}',
    )
    assert result.returncode == 0, result.stderr
    assert "(django_elasticache.W001)" in result.stderr
    assert "(django_elasticache.W002)" in result.stderr


def test_check_tag_elasticache_lists_every_invalid_setting_as_a_message() -> None:
    options = '{"TLS": true, "REFRES_INTERVAL": 5}'
    result = manage("a:1;b:2", "check", "--tag", "elasticache", ELASTICACHE_OPTIONS=options)
    assert result.returncode == 1
    assert "(django_elasticache.E001)" in result.stderr
    assert "(django_elasticache.E002)" in result.stderr and "'REFRES_INTERVAL'" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_deploy_warns_about_ignore_cluster_errors() -> None:
    options = '{"IGNORE_CLUSTER_ERRORS": true}'
    plain = manage("127.0.0.1:1", "check", ELASTICACHE_OPTIONS=options)
    deploy = manage("127.0.0.1:1", "check", "--deploy", ELASTICACHE_OPTIONS=options)
    assert "W101" not in plain.stderr
    assert "(django_elasticache.W101)" in deploy.stderr


def test_check_tag_elasticache_network_reaches_the_cluster(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=2)
    healthy = manage(cluster.location, "check", "--deploy", "--tag", "elasticache_network")
    assert healthy.returncode == 0, healthy.stderr
    cluster.kill_node(cluster.nodes[0])
    degraded = manage(cluster.location, "check", "--deploy", "--tag", "elasticache_network")
    assert degraded.returncode == 0 and "(django_elasticache.W202)" in degraded.stderr
    strict = manage(
        cluster.location,
        "check",
        "--deploy",
        "--tag",
        "elasticache_network",
        "--fail-level",
        "WARNING",
    )
    assert strict.returncode == 1 and "(django_elasticache.W202)" in strict.stderr


def test_elasticache_exit_0_when_every_node_answers(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=3)
    result = manage(cluster.location, "elasticache")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "cache 'default' (django_elasticache.memcached.ElastiCache): HEALTHY"
    assert f"endpoint {cluster.location}, config version 1, 3 of 3 nodes up" in lines[1]
    for node in cluster.nodes:
        [row] = [line for line in lines if node.address in line]
        assert row.split()[:4] == [node.hostname, node.address, "1.6.18", "up"]
    assert "this process has not discovered this cluster yet" in result.stdout


def test_elasticache_exit_1_with_a_node_killed(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=3)
    down = cluster.nodes[1]
    cluster.kill_node(down)
    result = manage(cluster.location, "elasticache", "default", "--timeout", "2")
    assert result.returncode == 1, result.stderr
    assert "DEGRADED" in result.stdout and "2 of 3 nodes up" in result.stdout
    assert f"{down.address} is down: cannot connect" in result.stdout


def test_elasticache_exit_2_with_the_endpoint_down(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=2)
    cluster.endpoint.stop()
    result = manage(cluster.location, "elasticache", "--timeout", "1")
    assert result.returncode == 2, result.stderr
    assert "UNREACHABLE" in result.stdout and f"Cluster discovery at {cluster.location}" in (
        result.stdout
    )


def test_elasticache_json_is_the_whole_picture(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=2)
    cluster.kill_node(cluster.nodes[0])
    result = manage(cluster.location, "elasticache", "--json", "--timeout", "2")
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["status"] == "degraded"
    [report] = document["caches"]
    assert report["alias"] == "default" and report["endpoint"] == cluster.location
    assert report["config_version"] == 1
    assert [node["up"] for node in report["nodes"]] == [False, True]
    alive = report["nodes"][1]
    assert alive["engine_version"] == "1.6.18" and alive["stats"]["bytes_limit"] == 16 << 20
    assert report["process"]["config_version"] is None


def test_elasticache_refuses_an_unknown_alias_with_exit_2() -> None:
    result = manage("127.0.0.1:1", "elasticache", "other")
    assert result.returncode == 2
    assert "'other' does not use a django_elasticache backend" in result.stderr


def test_python_m_status_reports_a_bare_location(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=2)
    command = [sys.executable, "-m", "django_elasticache", "status", cluster.location, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "healthy" and len(report["nodes"]) == 2
    cluster.endpoint.stop()
    down = subprocess.run(command[:-1], capture_output=True, text=True, timeout=TIMEOUT)
    assert down.returncode == 2 and "UNREACHABLE" in down.stdout
