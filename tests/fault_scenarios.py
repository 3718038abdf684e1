"""
The scenarios of the fault-injection suite, each run in a process of its own by
``test_interruptions`` (a scenario that hangs or corrupts a lock then costs one child, not
the test run): ``python tests/fault_scenarios.py MODE ARGUMENTS``, where MODE is
``signals``, ``asyncio``, ``uvloop`` or ``gevent`` and ARGUMENTS a JSON object (backend,
location, ca, seed, operations, node_pids). The last line printed is the scenario's
``Tally`` as JSON; a scenario still running after ``limit`` seconds prints every thread's
stack and exits 70.

- signals: a SIGALRM handler raises ``Interrupted`` (an ``Exception``) or ``Aborted`` (a
  ``BaseException``, like KeyboardInterrupt) in the calling thread during random calls;
  some rounds stall a node with SIGSTOP.
- asyncio: 20 tasks; calls cancelled or under ``wait_for`` after random delays, while a node
  is stalled now and then; asyncio's "exception was never retrieved" records are counted.
- uvloop: the asyncio scenario on uvloop's event loop, uvicorn's wherever it is installed.
- gevent (monkeypatched first thing, in this process only): 100 greenlets; ``gevent.Timeout``
  (as itself or as ``Interrupted``) around random calls, a killer greenlet ``kill()``ing
  random workers, which are started again on the same keys, a staller stopping nodes.
"""

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["gevent"]:
    from gevent import monkey

    monkey.patch_all()

import _thread
import asyncio
import contextlib
import faulthandler
import functools
import gc
import json
import logging
import os
import random
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import django
import uvloop
from django.conf import settings
from faults import (
    INTERRUPTS,
    LATE_MARGIN,
    OPERATION_TIMEOUT,
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

HUNG = 70
"""The child's exit status when it ran out of time (its stacks are on stderr)."""

ROUND = 50
"""Operations between two checks of every key in the signals scenario."""
STALL_CHANCE = 0.15
ASYNC_TASKS = 20
GREENLETS = 100


@contextlib.contextmanager
def stalled(pid: int, tally: Tally) -> Iterator[None]:
    """A node's memcached stopped (SIGSTOP) for the block, continued however it ends."""
    os.kill(pid, signal.SIGSTOP)
    tally.stalls += 1
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def stop_churning(arguments: dict[str, Any]) -> None:
    """Ask the parent to stop changing the node list, for the final check of every key."""
    if arguments["churn"]:
        Path(arguments["settled"]).touch()


# Signals


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
        signal.signal(signal.SIGALRM, self._fire)

    def _fire(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._armed = False
            self._tally.interrupts += 1
            raise self._raise()

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


def signals(cache: Any, arguments: dict[str, Any], tally: Tally) -> None:
    rng = random.Random(tally.seed)
    model = Model(tally, "s", keys=40, counters=6, rng=rng, keys_move=arguments["churn"])
    seed_counters(cache, model)
    interrupts = SignalInterrupts(rng, tally)
    for _ in range(0, arguments["operations"], ROUND):
        stall = not arguments["churn"] and rng.random() < STALL_CHANCE
        pid = rng.choice(arguments["node_pids"])
        with stalled(pid, tally) if stall else contextlib.nullcontext():
            interrupts.stalled = stall
            for _ in range(ROUND):
                perform(cache, random_operation(model), tally, interrupts, INTERRUPTS)
            interrupts.stalled = False
        # Checked at once when every node answers; a node just stalled is still marked down.
        check_when_back(cache, model, tally, "after a round", wait=0)
    stop_churning(arguments)
    check_when_back(cache, model, tally, "at the end")
    check_pools(cache, tally, "at the end")


# asyncio


class NeverRetrieved(logging.Handler):
    """Keeps asyncio's "exception was never retrieved" records."""

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
    except (asyncio.CancelledError, asyncio.TimeoutError) as error:
        if how == "plain":
            if isinstance(error, asyncio.CancelledError):
                raise
            tally.count_error(operation.name, error)
        else:
            tally.interrupts += 1
        operation.unknown()
    except Exception as error:
        tally.count_error(operation.name, error)
        operation.failed(error)
    else:
        operation.completed(result)
    finally:
        tally.finished(f"{how} {operation.name}", started, bound)


async def async_workload(cache: Any, arguments: dict[str, Any], tally: Tally) -> list[Model]:
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
        for _ in range(arguments["operations"] // ASYNC_TASKS):
            await run_async_operation(cache, model, tally, stall_flag["on"])

    async def staller() -> None:
        while not finished.is_set():
            await asyncio.sleep(rng.uniform(0.01, 0.1))
            with stalled(rng.choice(arguments["node_pids"]), tally):
                stall_flag["on"] = True
                await asyncio.sleep(rng.uniform(0.2, 2.5 * OPERATION_TIMEOUT))
                stall_flag["on"] = False

    stalls = asyncio.ensure_future(staller())
    try:
        await asyncio.gather(*(worker(model) for model in models))
    finally:
        finished.set()
        await stalls
    return models


def asyncio_scenario(
    cache: Any, arguments: dict[str, Any], tally: Tally, run: Callable[..., Any] = asyncio.run
) -> None:
    handler = NeverRetrieved()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    try:
        models = run(async_workload(cache, arguments, tally))
        gc.collect()
    finally:
        asyncio_logger.removeHandler(handler)
    tally.never_retrieved = len(handler.records)
    for record in handler.records[:3]:
        tally.note(f"never retrieved: {record}")
    for model in models:
        check_when_back(cache, model, tally, "after the async run")
    check_pools(cache, tally, "at the end")


# gevent


class TimeoutInterrupts:
    """A context manager: a ``gevent.Timeout`` after a random delay, raised as itself or as
    ``Interrupted``."""

    def __init__(self, rng: random.Random, stalls: dict[str, bool]) -> None:
        self._rng = rng
        self._stalls = stalls
        self._timeout: Any = None

    def __enter__(self) -> None:
        import gevent

        delay = random_delay(self._rng, self._stalls["on"])
        if delay is None:
            self._timeout = None
            return
        exception = self._rng.choice((None, Interrupted))
        self._timeout = gevent.Timeout(delay, exception)
        self._timeout.start()

    def __exit__(self, *exc_info: Any) -> None:
        timeout, self._timeout = self._timeout, None
        if timeout is not None:
            timeout.close()


def gevent_scenario(cache: Any, arguments: dict[str, Any], tally: Tally) -> None:
    import gevent
    from gevent import Greenlet

    rng = random.Random(tally.seed)
    operations = arguments["operations"] // GREENLETS
    stalls = {"on": False}
    models = [
        Model(
            tally,
            f"g{index}",
            keys=4,
            counters=1,
            rng=random.Random(rng.random()),
            keys_move=arguments["churn"],
        )
        for index in range(GREENLETS)
    ]
    done = {id(model): 0 for model in models}
    for model in models:
        seed_counters(cache, model)

    def worker(model: Model) -> None:
        """Run the model's operations; a kill ends it early (it is started again)."""
        interruption = TimeoutInterrupts(model.rng, stalls)
        me = gevent.getcurrent()
        while done[id(model)] < operations:
            operation = random_operation(model)
            me.operation = operation
            perform(cache, operation, tally, interruption, (gevent.Timeout, Interrupted), True)
            me.operation = None
            done[id(model)] += 1
            gevent.sleep(0)

    def start(model: Model) -> Any:
        greenlet = Greenlet(worker, model)
        greenlet.operation = None
        greenlet.model = model
        greenlet.start()
        return greenlet

    running = {id(model): start(model) for model in models}

    def killer() -> None:
        while True:
            gevent.sleep(rng.uniform(0, 0.003))
            victims = [greenlet for greenlet in running.values() if not greenlet.dead]
            if victims:
                rng.choice(victims).kill(rng.choice((gevent.GreenletExit, Aborted)), block=False)

    def staller() -> None:
        while True:
            gevent.sleep(rng.uniform(0.02, 0.3))
            with stalled(rng.choice(arguments["node_pids"]), tally):
                stalls["on"] = True
                try:
                    gevent.sleep(rng.uniform(0.05, 0.3))
                finally:
                    stalls["on"] = False

    helpers = [gevent.spawn(killer)]
    # libmemcached waits for a stalled node in C, holding up every greenlet for its poll
    # timeout, one caller after another: that measures libmemcached, not this package.
    if arguments["backend"] != "pylibmc" and not arguments["churn"]:
        helpers.append(gevent.spawn(staller))
    while True:
        alive = [greenlet for greenlet in running.values() if not greenlet.dead]
        if not alive:
            break
        gevent.joinall(alive, count=1, raise_error=False)
        for key, greenlet in list(running.items()):
            if not greenlet.dead or greenlet.model is None:
                continue
            killed = isinstance(greenlet.value, gevent.GreenletExit) or isinstance(
                greenlet.exception, Aborted
            )
            if not killed and not greenlet.successful():
                raise greenlet.exception
            tally.interrupts += killed
            if greenlet.operation is not None:
                greenlet.operation.unknown()
            if done[id(greenlet.model)] < operations:
                running[key] = start(greenlet.model)
            greenlet.model = None
    gevent.killall(helpers)
    stop_churning(arguments)
    for model in models:
        check_when_back(cache, model, tally, "after the gevent run")
    check_pools(cache, tally, "at the end")


SCENARIOS = {
    "signals": signals,
    "asyncio": asyncio_scenario,
    "uvloop": functools.partial(asyncio_scenario, run=uvloop.run),
    "gevent": gevent_scenario,
}


def start_watchdog(limit: float, tally: Tally, gevent_mode: bool) -> None:
    """
    After ``limit`` seconds, from a real thread (not a greenlet): print every thread's stack
    and the tally so far, and exit ``HUNG``.
    """
    start_thread, sleep = _thread.start_new_thread, time.sleep
    if gevent_mode:
        from gevent import monkey

        start_thread = monkey.get_original("_thread", "start_new_thread")
        sleep = monkey.get_original("time", "sleep")

    def watch() -> None:
        sleep(limit)
        faulthandler.dump_traceback(all_threads=True)
        with contextlib.suppress(Exception):
            print(json.dumps(tally.as_dict()), flush=True)
        os._exit(HUNG)

    start_thread(watch, ())


def main() -> None:
    mode, arguments = sys.argv[1], json.loads(sys.argv[2])
    tally = Tally(seed=arguments["seed"])
    start_watchdog(arguments["limit"], tally, mode == "gevent")
    settings.configure(CACHES={}, INSTALLED_APPS=[], USE_TZ=True)
    django.setup()
    import django_elasticache
    from django_elasticache import memcached, pymemcache

    backend_class = {"pylibmc": memcached.ElastiCache, "pymemcache": pymemcache.ElastiCache}
    tls = ssl.create_default_context(cadata=arguments["ca"]) if arguments["ca"] else None
    options = cache_options(arguments["backend"], tls, arguments["churn"])
    cache = backend_class[arguments["backend"]](arguments["location"], {"OPTIONS": options})
    try:
        SCENARIOS[mode](cache, arguments, tally)
    finally:
        for pid in arguments["node_pids"]:
            os.kill(pid, signal.SIGCONT)
    tally.package = django_elasticache.__file__
    print(json.dumps(tally.as_dict()), flush=True)


if __name__ == "__main__":
    main()
