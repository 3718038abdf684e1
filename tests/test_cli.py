"""``python -m django_elasticache``, run as a user runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from django_elasticache.testing import start_memcached

TIMEOUT = 60


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django_elasticache", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_discover_lists_nodes_and_their_engines(elasticache_cluster) -> None:
    result = run("discover", elasticache_cluster.location)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"config version {elasticache_cluster.config_version}, 3 nodes"
    for line, node in zip(lines[1:], elasticache_cluster.nodes, strict=True):
        address, hostname, engine, version = line.split()
        assert (address, hostname, engine) == (node.address, node.hostname, "memcached")
        assert version.split(".")[0].isdigit()


def test_discover_reports_a_silent_node(elasticache_cluster) -> None:
    down = elasticache_cluster.nodes[1]
    elasticache_cluster.kill_node(down)
    result = run("discover", elasticache_cluster.location, "--timeout", "1")
    assert result.returncode == 1
    assert f"{down.address}" in result.stdout and "NOT ANSWERING" in result.stdout
    assert result.stderr.strip() == "error: 1 of 3 nodes did not answer"


def test_discover_failure_is_one_line_and_exit_1() -> None:
    with start_memcached() as node:
        result = run("discover", node.address)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: Cluster discovery at {node.address} failed")


def test_discover_of_a_hanging_endpoint_ends_within_the_timeout(elasticache_cluster) -> None:
    elasticache_cluster.endpoint.misbehave("hang")
    result = run("discover", elasticache_cluster.location, "--timeout", "0.5")
    assert result.returncode == 1 and "timed out" in result.stderr


def test_discover_rejects_a_bad_location() -> None:
    result = run("discover", "not-a-location")
    assert result.returncode == 1 and "host:port" in result.stderr


def test_demo_spreads_keys_over_every_node() -> None:
    result = run("demo", "--nodes", "3", "--keys", "300")
    assert result.returncode == 0, result.stderr
    assert "all read back intact: True" in result.stdout
    counts = [int(line.split()[2]) for line in result.stdout.splitlines() if "holds" in line]
    assert len(counts) == 3 and all(counts) and sum(counts) == 300


def test_local_cluster_runs_until_interrupted() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "django_elasticache", "local-cluster", "--nodes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = process.stdout.readline()
        assert first.startswith("configuration endpoint: 127.0.0.1:")
        location = first.split()[-1]
        deadline = time.monotonic() + TIMEOUT
        while "Press Ctrl+C" not in process.stdout.readline():
            assert time.monotonic() < deadline
        assert run("discover", location).returncode == 0
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=TIMEOUT) == 0
        assert run("discover", location, "--timeout", "0.5").returncode == 1
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT)


def test_nodes_must_be_positive() -> None:
    result = run("local-cluster", "--nodes", "0")
    assert result.returncode == 2 and "must be at least 1" in result.stderr


def test_missing_ca_file_is_named_without_a_traceback() -> None:
    result = run("discover", "127.0.0.1:9", "--ca-file", "/nonexistent/ca.pem")
    assert result.returncode == 1
    assert result.stderr == (
        "error: cannot use CA file '/nonexistent/ca.pem': No such file or directory\n"
    )


def test_ca_file_without_certificates_is_named(tmp_path) -> None:
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    result = run("discover", "127.0.0.1:9", "--ca-file", str(not_pem))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot use CA file {str(not_pem)!r}: ")
    assert "Traceback" not in result.stderr


def test_nodes_must_be_a_whole_number() -> None:
    result = run("local-cluster", "--nodes", "abc")
    assert result.returncode == 2
    assert "argument --nodes: must be a positive whole number, got 'abc'" in result.stderr


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1", "-inf", "soon"])
def test_timeout_must_be_finite_and_positive(timeout: str) -> None:
    # "--timeout=-inf": argparse would read a separate "-inf" as an option.
    result = run("discover", "127.0.0.1:9", f"--timeout={timeout}")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        "argument --timeout: must be a finite number of seconds above 0 and at most 3600, "
        f"such as 2 or 0.5, got {timeout!r}"
    )
    assert "Traceback" not in result.stderr


def test_negative_timeout_as_a_separate_argument_is_refused() -> None:
    result = run("discover", "127.0.0.1:9", "--timeout", "-1")
    assert result.returncode == 2 and "got '-1'" in result.stderr


def test_fractional_timeout_is_accepted() -> None:
    result = run("discover", "127.0.0.1:9", "--timeout", "0.25")
    assert result.returncode == 1 and "cannot connect" in result.stderr
