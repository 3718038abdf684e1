"""
The gevent scenario of the fault-injection suite, run as a child process by
``test_interruptions``: monkeypatching comes first, in this process only.

100 greenlets run random cache operations on keys of their own; ``gevent.Timeout`` (raised
as itself, a ``BaseException``, or as an ``Exception``) interrupts some at random points and a
killer greenlet ``kill()``s random workers, which are started again on the same keys. A
staller stops a node with SIGSTOP now and then. The last line printed is the ``Tally`` as
JSON. Argument: a JSON object (backend, location, ca, seed, operations, node_pids).
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import django  # noqa: E402
import gevent  # noqa: E402
from django.conf import settings  # noqa: E402
from faults import (  # noqa: E402
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
from gevent import Greenlet  # noqa: E402

GREENLETS = 100
RUN_LIMIT = 240.0
"""Seconds after which the child gives up on its own (the parent kills it sooner or later)."""


class TimeoutInterrupts:
    """A context manager: a ``gevent.Timeout`` after a random delay, as itself or as
    ``Interrupted``."""

    def __init__(self, rng: random.Random, tally: Tally, stalls: dict[str, bool]) -> None:
        self._rng = rng
        self._tally = tally
        self._stalls = stalls
        self._timeout: gevent.Timeout | None = None

    def __enter__(self) -> None:
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


def worker(
    cache: Any, model: Model, tally: Tally, operations: int, stalls: dict[str, bool]
) -> None:
    """Run operations until ``operations`` were done; a kill ends it early (it is restarted)."""
    interruption = TimeoutInterrupts(model.rng, tally, stalls)
    me = gevent.getcurrent()
    while model.done < operations:
        operation = random_operation(model)
        me.operation = operation
        perform(cache, operation, tally, interruption, (gevent.Timeout, Interrupted), True)
        me.operation = None
        model.done += 1
        gevent.sleep(0)


def main() -> None:
    arguments = json.loads(sys.argv[1])
    settings.configure(CACHES={}, INSTALLED_APPS=[], USE_TZ=True)
    django.setup()
    from django_elasticache import memcached, pymemcache

    backend_class = {"pylibmc": memcached.ElastiCache, "pymemcache": pymemcache.ElastiCache}
    tls = ssl.create_default_context(cadata=arguments["ca"]) if arguments["ca"] else None
    options = cache_options(arguments["backend"], tls)
    cache = backend_class[arguments["backend"]](arguments["location"], {"OPTIONS": options})
    tally = Tally(seed=arguments["seed"])
    rng = random.Random(tally.seed)
    models = [
        Model(tally, f"g{index}", keys=4, counters=1, rng=random.Random(rng.random()))
        for index in range(GREENLETS)
    ]
    for model in models:
        seed_counters(cache, model)
        model.done = 0
    stalls = {"on": False}
    operations = arguments["operations"]

    def start(model: Model) -> Greenlet:
        greenlet = Greenlet(worker, cache, model, tally, operations, stalls)
        greenlet.operation = None
        greenlet.model = model
        greenlet.start()
        return greenlet

    running = {id(model): start(model) for model in models}

    def killer() -> None:
        while True:
            gevent.sleep(rng.uniform(0, 0.003))
            victims = [greenlet for greenlet in running.values() if not greenlet.dead]
            if not victims:
                return
            rng.choice(victims).kill(rng.choice((gevent.GreenletExit, Interrupted)), block=False)

    def staller() -> None:
        while True:
            gevent.sleep(rng.uniform(0.2, 0.6))
            pid = rng.choice(arguments["node_pids"])
            os.kill(pid, signal.SIGSTOP)
            tally.stalls += 1
            stalls["on"] = True
            try:
                gevent.sleep(rng.uniform(0.05, 0.3))
            finally:
                stalls["on"] = False
                os.kill(pid, signal.SIGCONT)

    helpers = [gevent.spawn(killer), gevent.spawn(staller)]
    with gevent.Timeout(RUN_LIMIT):
        while True:
            alive = [greenlet for greenlet in running.values() if not greenlet.dead]
            if alive:
                gevent.joinall(alive, count=1, raise_error=False)
            for key, greenlet in list(running.items()):
                if not greenlet.dead or greenlet.model is None:
                    continue
                killed = isinstance(greenlet.value, gevent.GreenletExit) or isinstance(
                    greenlet.exception, Interrupted
                )
                if not killed and not greenlet.successful():
                    raise greenlet.exception
                tally.interrupts += killed
                if greenlet.operation is not None:
                    greenlet.operation.unknown()
                if greenlet.model.done < operations:
                    running[key] = start(greenlet.model)
                greenlet.model = None
            if all(greenlet.dead for greenlet in running.values()):
                break
    gevent.killall(helpers)
    for pid in arguments["node_pids"]:
        os.kill(pid, signal.SIGCONT)
    for model in models:
        check_when_back(cache, model, tally, "after the gevent run")
    check_pools(cache, tally, "at the end")
    print(json.dumps(tally.as_dict()))


if __name__ == "__main__":
    main()
