"""No memcached outlives the process that started it, however that process ends.

Each test runs a real Python process (the CLI, a script using LocalCluster, a pytest run),
ends it with a signal, a crash or SIGKILL, and watches /proc until its nodes are gone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from support import is_alive, memcached_children, survivors

from django_elasticache.testing import LocalCluster

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

TIMEOUT = 60.0
CLUSTER_SCRIPT = """
import faulthandler, signal, sys, threading, time
from django_elasticache.testing import LocalCluster

faulthandler.disable()  # a crash below should just end the process
# The dispositions under test, whatever this process inherited: a background job of a
# non-interactive shell (or nohup) starts with SIGINT and SIGQUIT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGQUIT, signal.SIG_DFL)
clusters = [LocalCluster(nodes=2).start()]
# A cluster started from a thread that has ended keeps its nodes until the process ends.
starter = threading.Thread(target=lambda: clusters.append(LocalCluster(nodes=1).start()))
starter.start()
starter.join()
print(" ".join(str(node.pid) for cluster in clusters for node in cluster.nodes), flush=True)
if sys.stdin.readline().strip() == "crash":
    import ctypes
    ctypes.string_at(0)  # a segmentation fault, as a crashing C extension would cause
time.sleep(3600)
"""


def wait_for_children(process: subprocess.Popen[str], count: int) -> list[int]:
    """The memcached pids of process, once there are count of them."""
    deadline = time.monotonic() + TIMEOUT
    while len(children := memcached_children(process.pid)) < count:
        assert process.poll() is None, f"exited early with {process.returncode}"
        assert time.monotonic() < deadline, f"only {children} after {TIMEOUT} s"
        time.sleep(0.05)
    return children


def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "django_elasticache", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
    return process.returncode, stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_local_cluster_stops_cleanly_on_every_stop_signal(signum: int) -> None:
    process = start_cli("local-cluster", "--nodes", "2")
    assert process.stdout is not None
    while "Press Ctrl+C" not in process.stdout.readline():
        assert process.poll() is None
    pids = wait_for_children(process, 2)

    process.send_signal(signum)

    returncode, stderr = finish(process)
    assert (returncode, stderr) == (0, "")
    assert survivors(pids) == []


def test_local_cluster_nodes_die_with_a_killed_cli() -> None:
    process = start_cli("local-cluster", "--nodes", "3")
    pids = wait_for_children(process, 3)

    process.kill()

    assert finish(process)[0] == -signal.SIGKILL
    assert survivors(pids) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_demo_leaves_no_node_behind(signum: int) -> None:
    process = start_cli("demo", "--nodes", "3", "--keys", "200000")
    pids = wait_for_children(process, 3)

    process.send_signal(signum)

    returncode, stderr = finish(process)
    if signum == signal.SIGTERM:
        # Stopped mid-run (128 + 15), unless the demo won the race and finished.
        assert returncode in (128 + signal.SIGTERM, 0), stderr
        assert "Traceback" not in stderr
    assert survivors(pids) == []


@pytest.mark.parametrize("ending", ["SIGTERM", "SIGHUP", "SIGQUIT", "SIGINT", "SIGKILL", "crash"])
def test_nodes_die_with_a_python_process_however_it_ends(ending: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    pids = [int(pid) for pid in process.stdout.readline().split()]
    assert len(pids) == 3 and all(is_alive(pid) for pid in pids)

    if ending == "crash":
        process.stdin.write("crash\n")
        process.stdin.flush()
    else:
        process.send_signal(getattr(signal, ending))

    assert finish(process)[0] != 0
    assert survivors(pids) == []


def test_a_pytest_run_stopped_by_sigterm_leaves_no_node(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids.txt"
    test_file = tmp_path / "test_long.py"
    test_file.write_text(
        textwrap.dedent(
            f"""
            import time

            def test_waits(elasticache_cluster, elasticache_cluster_factory):
                other = elasticache_cluster_factory(nodes=2, tls=True)
                nodes = elasticache_cluster.nodes + other.nodes
                with open({str(pids_file)!r}, "w") as f:
                    f.write(" ".join(str(node.pid) for node in nodes))
                time.sleep(3600)
            """
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not pids_file.exists() or not pids_file.read_text():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pids = [int(pid) for pid in pids_file.read_text().split()]
        assert len(pids) == 5

        process.terminate()

        assert process.wait(TIMEOUT) == -signal.SIGTERM
    finally:
        process.kill()
        process.wait(TIMEOUT)
    assert survivors(pids) == []


def test_a_cluster_started_from_a_short_lived_thread_keeps_its_nodes() -> None:
    started: list[LocalCluster] = []
    native_ids: list[int] = []

    def start() -> None:
        native_ids.append(threading.get_native_id())
        started.append(LocalCluster(nodes=2).start())

    starter = threading.Thread(target=start)
    starter.start()
    starter.join(TIMEOUT)
    cluster = started[0]
    try:
        # join() returns a moment before the OS thread is gone; the kernel sends a death
        # signal to the children of a thread as it exits, so wait until it has.
        task = Path(f"/proc/self/task/{native_ids[0]}")
        deadline = time.monotonic() + TIMEOUT
        while task.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)

        for node in cluster.nodes:
            assert node.pid is not None and is_alive(node.pid)
            assert node.holds(["nothing"]) == 0
        added = cluster.add_node()  # started later, from this thread: also a survivor
        assert added.is_running
    finally:
        cluster.stop()
