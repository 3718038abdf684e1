"""
Fault injection: cache calls interrupted at random points must never hand a caller another
key's value, bring a deleted key back, leak a pooled client, leave a waiter hanging or raise
what the client libraries never raise.

Three ways a call is interrupted (``fault_scenarios``), on both backends, in clear text and
over TLS (pymemcache), each on a three-node local cluster:

- a signal (``setitimer``) whose handler raises an ``Exception`` or a ``BaseException``
  subclass in the calling thread, as request-timeout signals and Ctrl-C do;
- asyncio task cancellation and ``wait_for`` timeouts around the async methods, on asyncio's
  own event loop and on uvloop's;
- ``gevent.Timeout`` and ``Greenlet.kill()`` among 100 greenlets, in a monkeypatched process.

Nodes are stalled with SIGSTOP now and then. The model in ``faults`` checks every value read.
Each scenario runs in a child process bounded in time, which dies with the test run.

Every scenario prints its seed: ``FAULT_INJECTION_SEED=<seed>`` replays its random choices
(the timing of a loaded machine does not replay). ``FAULT_INJECTION_SCALE=20`` runs twenty
times as many operations, for a closing report; ``-s`` shows the counts of every scenario.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faults
import pytest
from faults import SCALE, Model, Tally

import django_elasticache
from django_elasticache.testing.processes import spawn

CONFIGURATIONS = [
    pytest.param(("pylibmc", False), id="pylibmc"),
    pytest.param(("pymemcache", False), id="pymemcache"),
    pytest.param(("pymemcache", True), id="pymemcache-tls"),
]

OPERATIONS = {
    "signals": int(1000 * SCALE),
    "asyncio": int(1200 * SCALE),
    "uvloop": int(1200 * SCALE),
    "gevent": int(1500 * SCALE),
}
"""Operations per scenario; about half of them are interrupted."""

LIMIT = 20.0 + 20.0 * SCALE
"""Seconds a scenario may run before its child prints its stacks and exits."""

SCENARIOS = Path(__file__).with_name("fault_scenarios.py")
HUNG = 70


def scenario_seed(name: str) -> int:
    chosen = os.environ.get("FAULT_INJECTION_SEED")
    seed = int(chosen) if chosen else random.SystemRandom().randrange(2**32)
    print(f"{name}: FAULT_INJECTION_SEED={seed}")
    return seed


@pytest.fixture(params=CONFIGURATIONS)
def cluster(request: pytest.FixtureRequest, elasticache_cluster_factory: Any) -> Any:
    backend, tls = request.param
    return backend, elasticache_cluster_factory(nodes=3, tls=tls)


def churn(cluster: Any, stop: threading.Event, settled: Path, rng: random.Random) -> None:
    """
    Scale out by a node and back in, again and again, until ``stop`` is set or the child
    creates ``settled`` to check every key on a node list that no longer changes (a node
    that comes and goes every second could keep the check from ever passing).
    """

    def pause() -> None:
        deadline = time.monotonic() + rng.uniform(0.2, 0.8)
        while time.monotonic() < deadline and not stop.wait(0.02):
            pass

    while not stop.is_set() and not settled.exists():
        node = cluster.add_node()
        pause()
        cluster.remove_node(node)
        pause()


def run_scenario(
    mode: str, backend: str, cluster: Any, settled: Path, churning: bool = False
) -> None:
    """
    Run one scenario in its child; fail with its counts if it saw any problem. Churning, the
    node list changes all along (a fourth node added and removed) until the child creates
    ``settled`` for its final check, and the child asks for it every
    ``faults.CHURN_REFRESH`` seconds; no node is stalled then, since a moved key's old copy
    on a node marked down is left in place by design (``routing``: a logged warning).
    """
    name = f"{mode} {backend}{' TLS' if cluster.tls else ''}{' churning' if churning else ''}"
    seed = scenario_seed(name)
    arguments = {
        "backend": backend,
        "location": cluster.location,
        "ca": cluster.certificate_authority.ca_pem if cluster.tls else None,
        "seed": seed,
        "operations": OPERATIONS[mode],
        "node_pids": [node.pid for node in cluster.nodes],
        "limit": LIMIT,
        "churn": churning,
        "settled": str(settled),
    }
    # The child imports the package this run tests, wherever it was imported from.
    package_root = str(Path(django_elasticache.__file__).parent.parent)
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    child = spawn(
        [sys.executable, str(SCENARIOS), mode, json.dumps(arguments)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path},
    )
    stop_churning = threading.Event()
    churner = threading.Thread(
        target=churn, args=(cluster, stop_churning, settled, random.Random(seed))
    )
    if churning:
        churner.start()
    try:
        out, err = child.communicate(timeout=LIMIT + 30)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    finally:
        stop_churning.set()
        if churning:
            churner.join()
        for pid in arguments["node_pids"]:  # The child may have died with a node stopped.
            os.kill(pid, signal.SIGCONT)
    lines = out.decode().strip().splitlines()
    if child.returncode not in (0, HUNG) or not lines:
        pytest.fail(f"{name} (seed {seed}): the child failed: {err.decode()[-4000:]}")
    tally = Tally(seed=seed)
    tally.add(json.loads(lines[-1]))
    summary = tally.summary(name)
    print(summary)
    if child.returncode == HUNG:
        pytest.fail(f"{summary}\nHUNG after {LIMIT} s; its stacks:\n{err.decode()[-6000:]}")
    assert not tally.problems(), summary


@pytest.mark.parametrize("mode", ["signals", "asyncio", "uvloop", "gevent"])
def test_interrupted_calls(mode: str, cluster: Any, tmp_path: Path) -> None:
    backend, local_cluster = cluster
    run_scenario(mode, backend, local_cluster, tmp_path / "settled")


@pytest.mark.parametrize("mode", ["signals", "gevent"])
def test_interrupted_calls_while_the_node_list_changes(
    mode: str, cluster: Any, tmp_path: Path
) -> None:
    backend, local_cluster = cluster
    run_scenario(mode, backend, local_cluster, tmp_path / "settled", churning=True)


def test_the_model_catches_what_it_must() -> None:
    """Another key's value, a stale value and a resurrected one are told from good reads."""
    tally = Tally()
    model = Model(tally, "m", keys=2, counters=1, rng=random.Random(0))
    first, second = list(model.keys)
    old, old_value = model.new_value(first)
    model.keys[first].applied(old)
    new, new_value = model.new_value(first)
    model.keys[first].applied(new)
    model.check(first, new_value, "get")
    model.check(first, None, "get")
    assert tally.problems() == {}
    model.check(second, new_value, "get")
    model.check(first, old_value, "get")
    model.check(next(iter(model.counters)), new_value, "get")
    deleted = model.new_delete(first)
    model.keys[first].applied(deleted)
    model.check(first, new_value, "get")
    assert (tally.wrong_values, tally.resurrected) == (3, 1)
    assert faults.decode(faults.encode("k", 3, 5)) == ("k", 3)


def test_an_unknown_write_may_land_late() -> None:
    """An interrupted write may be applied after a newer one; an older completed one may not."""
    tally = Tally()
    model = Model(tally, "m", keys=1, counters=0, rng=random.Random(0))
    (key,) = model.keys
    interrupted, interrupted_value = model.new_value(key)
    model.keys[key].uncertain(interrupted)
    completed, _ = model.new_value(key)
    model.keys[key].applied(completed)
    model.check(key, interrupted_value, "get")
    assert tally.problems() == {}


def test_an_unknown_increment_may_land_late() -> None:
    """An interrupted incr may be applied after a later one returned."""
    tally = Tally()
    model = Model(tally, "m", keys=1, counters=1, rng=random.Random(0))
    (counter,) = model.counters
    band = model.bands[counter]
    model.counters[counter] = (band, band)
    interrupted, completed = faults.Incr(model), faults.Incr(model)
    interrupted.unknown()
    completed.completed(band + completed.delta)
    model.check(counter, band + completed.delta + interrupted.delta, "get")
    model.check(counter, band + completed.delta + interrupted.delta + 1, "get")
    assert tally.wrong_values == 1
