"""
Fault injection: cache calls interrupted at random points must never hand a caller another
key's value, bring a deleted key back, leak a pooled client or leave a waiter hanging.

Three ways a call is interrupted, on both backends, in clear text and over TLS (pymemcache):

- a signal (``setitimer``) whose handler raises an ``Exception`` or a ``BaseException``
  subclass in the calling thread, as request-timeout signals and Ctrl-C do;
- asyncio task cancellation and ``wait_for`` timeouts around the async methods;
- ``gevent.Timeout`` and ``Greenlet.kill()`` among 100 greenlets, in a monkeypatched child
  process (``gevent_faults.py``).

Some rounds stall a node with SIGSTOP. The model in ``faults`` checks every value read.
Every scenario logs its seed: ``FAULT_INJECTION_SEED=<seed>`` replays its random choices
(the timing of a loaded machine does not replay). ``FAULT_INJECTION_SCALE=20`` runs twenty
times as many operations, for a closing report; run with ``-s`` to see the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faults
import pytest
from conftest import BACKENDS, factory
from faults import (
    INTERRUPTS,
    LATE_MARGIN,
    OPERATION_TIMEOUT,
    SCALE,
    Aborted,
    Interrupted,
    Model,
    Tally,
    cache_options,
    check_pools,
    check_when_back,
    perform,
    random_delay,
    random_operation,
    seed_counters,
)

from django_elasticache.testing.processes import spawn

CONFIGURATIONS = [
    pytest.param(("pylibmc", False), id="pylibmc"),
    pytest.param(("pymemcache", False), id="pymemcache"),
    pytest.param(("pymemcache", True), id="pymemcache-tls"),
]

SYNC_OPERATIONS = int(1200 * SCALE)
ROUND = 50
"""Operations between two checks of every key; some rounds stall a node."""
STALL_CHANCE = 0.15
ASYNC_TASKS = 20
ASYNC_OPERATIONS = int(60 * SCALE)  # per task
GEVENT_OPERATIONS = int(10 * SCALE)  # per greenlet, 100 greenlets
CHILD_TIMEOUT = 60.0 + 30.0 * SCALE
"""Seconds the gevent child may run before it is killed and the test fails."""

GEVENT_CHILD = Path(__file__).with_name("gevent_faults.py")


def scenario_seed(name: str) -> int:
    base = os.environ.get("FAULT_INJECTION_SEED")
    seed = int(base) if base else random.SystemRandom().randrange(2**32)
    print(f"{name}: FAULT_INJECTION_SEED={seed}")
    return seed


@pytest.fixture(params=CONFIGURATIONS)
def setup(request: pytest.FixtureRequest, elasticache_cluster_factory: Any) -> Any:
    backend, tls = request.param
    cluster = elasticache_cluster_factory(nodes=3, tls=tls)
    options = cache_options(backend, cluster.client_tls_context() if tls else None)
    cache = factory(BACKENDS[backend])(cluster.location, **options)
    return backend, tls, cluster, cache


def report(scenario: str, tally: Tally) -> None:
    print(tally.summary(scenario))
    assert not tally.problems(), tally.summary(scenario)


@contextlib.contextmanager
def stalled(node: Any, tally: Tally) -> Iterator[None]:
    """The node's memcached stopped (SIGSTOP) for the block, continued however it ends."""
    os.kill(node.pid, signal.SIGSTOP)
    tally.stalls += 1
    try:
        yield
    finally:
        os.kill(node.pid, signal.SIGCONT)


class SignalInterrupts:
    """
    A context manager that, entered, arms SIGALRM after a random delay; its handler raises
    ``Interrupted`` or ``Aborted`` in the calling thread, once, while still armed.
    """

    def __init__(self, rng: random.Random, tally: Tally) -> None:
        self._rng = rng
        self._tally = tally
        self._armed = False
        self._raise: type[BaseException] = Interrupted
        self.stalled = False

    def _fire(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._armed = False
            self._tally.interrupts += 1
            raise self._raise()

    @contextlib.contextmanager
    def installed(self) -> Iterator[SignalInterrupts]:
        previous = signal.signal(signal.SIGALRM, self._fire)
        try:
            yield self
        finally:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def __enter__(self) -> None:
        delay = random_delay(self._rng, self.stalled)
        if delay is None:
            return
        self._raise = self._rng.choice(INTERRUPTS)
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, delay)

    def __exit__(self, *exc_info: Any) -> None:
        self._armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_signals_interrupting_sync_calls(setup: Any) -> None:
    backend, tls, cluster, cache = setup
    name = f"signals {backend}{' TLS' if tls else ''}"
    tally = Tally(seed=scenario_seed(name))
    rng = random.Random(tally.seed)
    model = Model(tally, "s", keys=40, counters=6, rng=rng)
    seed_counters(cache, model)
    interrupts = SignalInterrupts(rng, tally)
    with interrupts.installed():
        for _ in range(0, SYNC_OPERATIONS, ROUND):
            stall = rng.random() < STALL_CHANCE
            with stalled(rng.choice(cluster.nodes), tally) if stall else contextlib.nullcontext():
                interrupts.stalled = stall
                for _ in range(ROUND):
                    perform(cache, random_operation(model), tally, interrupts, INTERRUPTS)
                interrupts.stalled = False
            # Checked at once when every node answers; a node just stalled is still marked down.
            check_when_back(cache, model, tally, "after a round", wait=0)
    check_when_back(cache, model, tally, "at the end")
    check_pools(cache, tally, "at the end")
    report(name, tally)


# asyncio


class NeverRetrieved(logging.Handler):
    """Counts asyncio's "exception was never retrieved" records."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "never retrieved" in message:
            self.records.append(message[:300])


ASYNC_BOUND = 3 * OPERATION_TIMEOUT + LATE_MARGIN
"""Longest an async call may take: a timeout per stage (connect, TLS, reply), and the margin."""


async def run_async_operation(cache: Any, model: Model, tally: Tally, stalled: bool) -> None:
    """One operation, awaited plainly, under ``wait_for`` or cancelled after a random delay."""
    rng = model.rng
    operation = random_operation(model)
    delay = random_delay(rng, stalled)
    how = "plain" if delay is None else rng.choice(("wait_for", "cancel"))
    started = time.monotonic()
    bound = ASYNC_BOUND if delay is None else min(delay + LATE_MARGIN, ASYNC_BOUND)
    try:
        if how == "plain":
            result = await operation.acall(cache)
        elif how == "wait_for":
            result = await asyncio.wait_for(operation.acall(cache), delay)
        else:
            task = asyncio.ensure_future(operation.acall(cache))
            timer = asyncio.get_running_loop().call_later(delay, task.cancel)
            try:
                result = await task
            finally:
                timer.cancel()
    except (asyncio.CancelledError, asyncio.TimeoutError):
        if how == "plain":
            raise
        tally.interrupts += 1
        operation.unknown()
    except Exception as error:
        tally.errors[type(error).__name__] += 1
        operation.failed(error)
    else:
        operation.completed(result)
    finally:
        tally.operations += 1
        took = time.monotonic() - started
        if took > bound:
            tally.record("late", f"{how} {operation.name} took {took:.2f} s (bound {bound:.2f})")


async def async_workload(cache: Any, cluster: Any, tally: Tally) -> list[Model]:
    rng = random.Random(tally.seed)
    models = [
        Model(tally, f"a{task}", keys=8, counters=2, rng=random.Random(rng.random()))
        for task in range(ASYNC_TASKS)
    ]
    for model in models:
        for key, band in model.bands.items():
            await cache.aset(key, band, None)
            model.counters[key] = (band, band)
    stall_flag = {"on": False}
    finished = asyncio.Event()

    async def worker(model: Model) -> None:
        for _ in range(ASYNC_OPERATIONS):
            await run_async_operation(cache, model, tally, stall_flag["on"])

    async def staller() -> None:
        while not finished.is_set():
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            if rng.random() < 0.5:
                with stalled(rng.choice(cluster.nodes), tally):
                    stall_flag["on"] = True
                    await asyncio.sleep(rng.uniform(0.05, 0.4))
                    stall_flag["on"] = False

    stalls = asyncio.ensure_future(staller())
    try:
        await asyncio.gather(*(worker(model) for model in models))
    finally:
        finished.set()
        await stalls
    return models


def test_asyncio_cancelling_async_calls(setup: Any) -> None:
    backend, tls, cluster, cache = setup
    name = f"asyncio {backend}{' TLS' if tls else ''}"
    tally = Tally(seed=scenario_seed(name))
    handler = NeverRetrieved()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    try:
        models = asyncio.run(async_workload(cache, cluster, tally))
        gc.collect()
    finally:
        asyncio_logger.removeHandler(handler)
    tally.never_retrieved = len(handler.records)
    for record in handler.records[:3]:
        tally.note(f"never retrieved: {record}")
    for model in models:
        check_when_back(cache, model, tally, "after the async run")
    check_pools(cache, tally, "at the end")
    report(name, tally)


# gevent


def test_gevent_timeouts_and_kills(setup: Any) -> None:
    backend, tls, cluster, _ = setup
    name = f"gevent {backend}{' TLS' if tls else ''}"
    seed = scenario_seed(name)
    arguments = {
        "backend": backend,
        "location": cluster.location,
        "ca": cluster.certificate_authority.ca_pem if tls else None,
        "seed": seed,
        "operations": GEVENT_OPERATIONS,
        "node_pids": [node.pid for node in cluster.nodes],
    }
    child = spawn(
        [sys.executable, str(GEVENT_CHILD), json.dumps(arguments)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        out, err = child.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        pytest.fail(f"{name}: the child ran over {CHILD_TIMEOUT} s; seed {seed}: {err[-3000:]!r}")
    finally:
        for node in cluster.nodes:
            os.kill(node.pid, signal.SIGCONT)
    assert child.returncode == 0, f"{name}: the child failed; seed {seed}: {err.decode()[-4000:]}"
    tally = Tally(seed=seed)
    tally.add(json.loads(out.decode().strip().splitlines()[-1]))
    report(name, tally)


def test_models_catch_what_they_must() -> None:
    """The model is not blind: another key's value, a stale and a resurrected one are caught."""
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
    deleted = model.new_delete(first)
    model.keys[first].applied(deleted)
    model.check(first, new_value, "get")
    model.check(list(model.counters)[0], new_value, "get")
    assert (tally.wrong_values, tally.resurrected) == (3, 1)
    assert faults.decode(faults.encode("k", 3, 5)) == ("k", 3)
