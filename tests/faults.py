"""
The fault-injection suite's model and workloads, shared by ``test_interruptions`` and the
gevent child it starts (``gevent_faults.py``).

A workload runs random cache operations on keys it owns alone (so each key's operations
happen one after another) while something interrupts them at random points. Every value
read is checked against a model of what the key may hold:

- a value names its key and a version (``key@version@padding``), so another key's value, a
  reply meant for an earlier request or garbage is told apart from the key's own value;
- a write whose outcome is known moves the key's floor: no older value may be read after it,
  and after a completed delete no value written before it may come back;
- a write whose outcome is unknown (interrupted, timed out) may or may not have landed, and
  may land late: it stays readable, and so does an unknown write that started within
  ``LATE_LANDING`` seconds before the write that set the floor (memcached may process an
  abandoned connection's request after a newer one sent on another connection);
- a miss is always allowed (a failed node, a dropped connection).

Counters (``incr``) live in bands of their own (counter *i* stays within
``[(i+1)·10⁶, (i+2)·10⁶)``) and must read within what the known and the attempted increments
allow.

``Tally`` counts what a run saw; ``Tally.problems()`` is what the tests assert to be empty.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pylibmc
from pymemcache.exceptions import MemcacheError

from django_elasticache.cluster_utils import ClusterDiscoveryError
from django_elasticache.pool import NodeError

SCALE = float(os.environ.get("FAULT_INJECTION_SCALE", "1"))
"""How many more operations (so interrupts) each scenario runs: 20 for a closing report."""

LATE_LANDING = 5.0
"""Seconds an abandoned write may still be applied after a newer one was sent."""

COUNTER_BAND = 1_000_000

OPERATION_TIMEOUT = 0.5
"""The clients' connect and reply timeouts in these scenarios (s)."""

LATE_MARGIN = 3.0
"""How far past its own bound a call may end on a loaded machine before it counts as late."""

EXPECTED_ERRORS: tuple[type[Exception], ...] = (
    pylibmc.Error,
    MemcacheError,
    OSError,
    NodeError,
    ClusterDiscoveryError,
)
"""What a failing call may raise: the library's errors, socket errors and the pools' own.
Anything else (a RuntimeError from a lock, a KeyError from a reply matched to the wrong
request) is a failure of the suite."""


class Interrupted(Exception):
    """An interrupt an application turns into an ordinary exception (a request timeout)."""


class Aborted(BaseException):
    """An interrupt outside ``Exception``, as KeyboardInterrupt or gevent.Timeout are."""


INTERRUPTS = (Interrupted, Aborted)


def encode(key: str, version: int, padding: int) -> str:
    return f"{key}@{version}@{'x' * padding}"


def decode(value: object) -> tuple[str, int] | None:
    if not isinstance(value, str):
        return None
    parts = value.split("@")
    if len(parts) != 3 or not parts[1].isdigit() or parts[2].strip("x"):
        return None
    return parts[0], int(parts[1])


@dataclasses.dataclass
class _Write:
    version: int
    started: float
    value: str | None  # None: a delete


class KeyModel:
    """What one key may hold, from the writes made to it."""

    def __init__(self) -> None:
        self.floor: _Write | None = None  # The last write whose outcome is known.
        self.unknown: list[_Write] = []
        self.written: set[int] = set()

    def attempt(self, version: int, deleting: bool) -> _Write:
        if not deleting:
            self.written.add(version)
        return _Write(version, time.monotonic(), None if deleting else "set")

    def applied(self, write: _Write) -> None:
        if self.floor is None or write.version > self.floor.version:
            self.floor = write
            # Unknown writes that cannot land after it any more no longer matter.
            self.unknown = [
                old
                for old in self.unknown
                if old.version > write.version or write.started - old.started < LATE_LANDING
            ]

    def uncertain(self, write: _Write) -> None:
        self.unknown.append(write)

    def verdict(self, version: int) -> str | None:
        """None if a read of this version is allowed, else what is wrong with it."""
        if version not in self.written:
            return "a version never written to this key"
        floor = self.floor
        if floor is None or version >= floor.version:
            return None
        if any(write.version == version for write in self.unknown):
            return None
        return "resurrected" if floor.value is None else "stale"


@dataclasses.dataclass
class Tally:
    """What a run saw. ``problems()`` must be empty."""

    seed: int = 0
    package: str = ""
    operations: int = 0
    interrupts: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    wrong_values: int = 0
    resurrected: int = 0
    leaked_clients: int = 0
    late_waiters: int = 0
    never_retrieved: int = 0
    unexpected_errors: int = 0
    stalls: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)
    first_errors: dict[str, str] = dataclasses.field(default_factory=dict)

    def record(self, kind: str, detail: str) -> None:
        if kind == "resurrected":
            self.resurrected += 1
        elif kind == "late":
            self.late_waiters += 1
        else:
            self.wrong_values += 1
        self.note(f"{kind}: {detail}")

    def count_error(self, operation: str, error: BaseException) -> None:
        name = type(error).__name__
        self.errors[name] += 1
        if not isinstance(error, EXPECTED_ERRORS) and not (
            operation == "incr" and isinstance(error, ValueError)  # counted as a wrong value
        ):
            self.unexpected_errors += 1
            if self.unexpected_errors == 1:  # where it came from, to find the cause
                trace = "".join(traceback.format_exception(error))
                self.note(f"unexpected {operation}: {trace[-3000:]}")
        self.first_errors.setdefault(name, f"{operation}: {error}"[:200])

    def finished(self, operation: str, started: float, bound: float) -> None:
        """One more operation; a late one if it ended more than ``bound`` s after ``started``."""
        self.operations += 1
        took = time.monotonic() - started
        if took > bound:
            self.record("late", f"{operation} took {took:.2f} s (bound {bound:.2f} s)")

    def note(self, example: str) -> None:
        if len(self.examples) < 8:
            self.examples.append(example)

    def problems(self) -> dict[str, int]:
        counts = {
            "wrong values": self.wrong_values,
            "resurrected keys": self.resurrected,
            "leaked clients": self.leaked_clients,
            "late waiters": self.late_waiters,
            "never-retrieved records": self.never_retrieved,
            "unexpected errors": self.unexpected_errors,
        }
        return {name: count for name, count in counts.items() if count}

    def add(self, other: dict[str, Any]) -> None:
        for name in (
            "operations",
            "interrupts",
            "wrong_values",
            "resurrected",
            "leaked_clients",
            "late_waiters",
            "never_retrieved",
            "unexpected_errors",
            "stalls",
        ):
            setattr(self, name, getattr(self, name) + other[name])
        self.package = other["package"]
        self.errors.update(other["errors"])
        self.first_errors = {**other["first_errors"], **self.first_errors}
        self.examples += other["examples"][: max(0, 8 - len(self.examples))]

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "errors": dict(self.errors)}

    def summary(self, scenario: str) -> str:
        errors = ", ".join(f"{name} {count}" for name, count in self.errors.most_common(6))
        lines = [
            f"{scenario} (seed {self.seed}, {self.package}): {self.operations} operations, "
            f"{self.interrupts} interrupts delivered, {self.stalls} stalls; "
            f"wrong values {self.wrong_values}, resurrected keys {self.resurrected}, "
            f"leaked clients {self.leaked_clients}, late waiters {self.late_waiters}, "
            f"never-retrieved records {self.never_retrieved}, "
            f"unexpected errors {self.unexpected_errors}",
            f"  errors raised: {errors or 'none'}",
        ]
        lines += [f"  {example}" for example in self.examples]
        lines += [f"  first {name}: {text}" for name, text in self.first_errors.items()]
        return "\n".join(lines)


class Model:
    """The keys and counters of one workload, and the checks of every value read."""

    def __init__(
        self,
        tally: Tally,
        prefix: str,
        keys: int,
        counters: int,
        rng: random.Random,
        keys_move: bool = False,
    ):
        self.tally = tally
        # The node list changes: a counter moved to a new node starts there afresh, and its
        # old copy is found again when the node leaves (values are checked as ever: a write
        # deletes a moved key's old copy).
        self.keys_move = keys_move
        self.rng = rng
        self.keys = {f"{prefix}k{index}": KeyModel() for index in range(keys)}
        self.counters: dict[str, tuple[int, int] | None] = {
            f"{prefix}c{index}": None for index in range(counters)
        }
        self.bands = {key: (index + 1) * COUNTER_BAND for index, key in enumerate(self.counters)}
        self.lost_counters: set[str] = set()
        self.unknown_increments: dict[str, list[tuple[float, int]]] = {}
        self._version = 0

    # Writes

    def new_value(self, key: str) -> tuple[_Write, str]:
        self._version += 1
        write = self.keys[key].attempt(self._version, deleting=False)
        # 100,000: a storage request in pieces (``protocol.UNCOPIED_DATA_BYTES``).
        padding = self.rng.choice((0, 10, 200, 3000, 40_000, 100_000))
        return write, encode(key, self._version, padding)

    def new_delete(self, key: str) -> _Write:
        self._version += 1
        return self.keys[key].attempt(self._version, deleting=True)

    # Reads

    def check(self, key: str, value: object, operation: str) -> None:
        """A value read for key: None (a miss) or one the model allows."""
        if value is None:
            return
        if key in self.counters:
            self._check_counter(key, value, operation)
            return
        decoded = decode(value)
        if decoded is None:
            self.tally.record(
                "wrong", f"{operation} {key}: not a value of this test: {value!r:.80}"
            )
            return
        owner, version = decoded
        if owner != key:
            self.tally.record(
                "wrong", f"{operation} {key}: got {owner}'s value, version {version}"
            )
            return
        verdict = self.keys[key].verdict(version)
        if verdict is not None:
            floor = self.keys[key].floor
            last = f"{floor.value or 'delete'} v{floor.version}" if floor else "none"
            self.tally.record(
                "resurrected" if verdict == "resurrected" else "wrong",
                f"{operation} {key}: version {version} is {verdict} (last known write: {last})",
            )

    def check_many(self, asked: Iterable[str], found: dict[str, Any], operation: str) -> None:
        asked = set(asked)
        for key, value in found.items():
            if key not in asked:
                self.tally.record("wrong", f"{operation}: key {key!r} was not asked for")
            else:
                self.check(key, value, operation)

    def _check_counter(self, key: str, value: object, operation: str) -> None:
        band = self.bands[key]
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or not band <= value < band + COUNTER_BAND:
            self.tally.record("wrong", f"{operation} {key}: not this counter's: {value!r:.80}")
            return
        known = self.counters[key]
        if known is not None and not known[0] <= value <= known[1]:
            self.tally.record(
                "wrong", f"{operation} {key}: {value} outside what was added {known}"
            )


# The operations: each one's call (sync), acall (async) and what it means for the model.


class Operation:
    """One random cache call, and how its outcome updates the model."""

    name = ""

    def __init__(self, model: Model) -> None:
        self.model = model

    def call(self, cache: Any) -> Any:
        raise NotImplementedError

    async def acall(self, cache: Any) -> Any:
        raise NotImplementedError

    def completed(self, result: Any) -> None:
        """The call returned ``result``."""

    def unknown(self) -> None:
        """The call was interrupted or raised: its writes may or may not have landed."""

    def failed(self, error: Exception) -> None:
        """The call raised ``error`` (not an interrupt)."""
        self.unknown()


class Get(Operation):
    name = "get"

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.key = model.rng.choice([*model.keys, *model.counters])

    def call(self, cache: Any) -> Any:
        return cache.get(self.key)

    async def acall(self, cache: Any) -> Any:
        return await cache.aget(self.key)

    def completed(self, result: Any) -> None:
        self.model.check(self.key, result, self.name)


class GetMany(Operation):
    name = "get_many"

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        pool = [*model.keys, *model.counters]
        self.keys = model.rng.sample(pool, model.rng.randint(1, len(pool)))

    def call(self, cache: Any) -> Any:
        return cache.get_many(self.keys)

    async def acall(self, cache: Any) -> Any:
        return await cache.aget_many(self.keys)

    def completed(self, result: Any) -> None:
        self.model.check_many(self.keys, result, self.name)


class Set(Operation):
    name = "set"

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.key = model.rng.choice(list(model.keys))
        self.write, self.value = model.new_value(self.key)

    def call(self, cache: Any) -> Any:
        return cache.set(self.key, self.value, None)

    async def acall(self, cache: Any) -> Any:
        return await cache.aset(self.key, self.value, None)

    def completed(self, result: Any) -> None:
        self.model.keys[self.key].applied(self.write)

    def unknown(self) -> None:
        self.model.keys[self.key].uncertain(self.write)


class Add(Set):
    name = "add"

    def call(self, cache: Any) -> Any:
        return cache.add(self.key, self.value, None)

    async def acall(self, cache: Any) -> Any:
        return await cache.aadd(self.key, self.value, None)

    def completed(self, result: Any) -> None:
        if result:
            self.model.keys[self.key].applied(self.write)


class Delete(Operation):
    name = "delete"

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.key = model.rng.choice(list(model.keys))
        self.write = model.new_delete(self.key)

    def call(self, cache: Any) -> Any:
        return cache.delete(self.key)

    async def acall(self, cache: Any) -> Any:
        return await cache.adelete(self.key)

    def completed(self, result: Any) -> None:
        self.model.keys[self.key].applied(self.write)

    def unknown(self) -> None:
        self.model.keys[self.key].uncertain(self.write)


class SetMany(Operation):
    name = "set_many"

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        keys = model.rng.sample(list(model.keys), model.rng.randint(1, len(model.keys)))
        self.writes = {key: model.new_value(key) for key in keys}

    def call(self, cache: Any) -> Any:
        return cache.set_many({key: value for key, (_, value) in self.writes.items()}, None)

    async def acall(self, cache: Any) -> Any:
        return await cache.aset_many({key: value for key, (_, value) in self.writes.items()}, None)

    def completed(self, result: Any) -> None:
        for key, (write, _) in self.writes.items():
            if key in result:
                self.model.keys[key].uncertain(write)
            else:
                self.model.keys[key].applied(write)

    def unknown(self) -> None:
        for key, (write, _) in self.writes.items():
            self.model.keys[key].uncertain(write)


class DeleteMany(Operation):
    name = "delete_many"

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        keys = model.rng.sample(list(model.keys), model.rng.randint(1, len(model.keys) // 2))
        self.writes = {key: model.new_delete(key) for key in keys}

    def call(self, cache: Any) -> Any:
        return cache.delete_many(list(self.writes))

    async def acall(self, cache: Any) -> Any:
        return await cache.adelete_many(list(self.writes))

    def completed(self, result: Any) -> None:
        for key, write in self.writes.items():
            self.model.keys[key].applied(write)

    def unknown(self) -> None:
        for key, write in self.writes.items():
            self.model.keys[key].uncertain(write)


class Incr(Operation):
    name = "incr"

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.key = model.rng.choice(list(model.counters))
        self.delta = model.rng.randint(1, 3)
        self.started = time.monotonic()

    def call(self, cache: Any) -> Any:
        return cache.incr(self.key, self.delta)

    async def acall(self, cache: Any) -> Any:
        return await cache.aincr(self.key, self.delta)

    def completed(self, result: Any) -> None:
        model = self.model
        known = model.counters[self.key]
        model.counters[self.key] = None  # Checked against the band alone, then below.
        model.check(self.key, result, self.name)
        if known is not None and not known[0] + self.delta <= result <= known[1] + self.delta:
            model.tally.record(
                "wrong", f"incr {self.key} by {self.delta} gave {result}, known {known}"
            )
        # Increments whose outcome is unknown may still land after this one (LATE_LANDING).
        pending = [
            (started, delta)
            for started, delta in model.unknown_increments.get(self.key, [])
            if self.started - started < LATE_LANDING
        ]
        model.unknown_increments[self.key] = pending
        known_now = isinstance(result, int) and not model.keys_move
        late = sum(delta for _, delta in pending)
        model.counters[self.key] = (result, result + late) if known_now else None

    def failed(self, error: Exception) -> None:
        if isinstance(error, ValueError):  # Django's "not found": counters are never deleted
            if not self.model.keys_move:
                self.model.tally.record("wrong", f"incr {self.key}: {error}")
            self.model.lost_counters.add(self.key)
        self.unknown()

    def unknown(self) -> None:
        self.model.unknown_increments.setdefault(self.key, []).append((self.started, self.delta))
        known = self.model.counters[self.key]
        if known is not None:
            self.model.counters[self.key] = (known[0], known[1] + self.delta)


OPERATIONS: list[Callable[[Model], Operation]] = [
    Get,
    Get,
    GetMany,
    Set,
    Add,
    Delete,
    SetMany,
    DeleteMany,
    Incr,
]


def random_operation(model: Model) -> Operation:
    return model.rng.choice(OPERATIONS)(model)


def seed_counters(cache: Any, model: Model) -> None:
    """
    Give every counter its band's start, with no interrupt around. The node list may be
    changing already: a counter whose node went away as it was set is left unknown.
    """
    for key in model.bands:
        start_counter(cache, model, key, known=True)


def reseed_lost_counters(cache: Any, model: Model) -> None:
    """Counters reported missing (already counted as wrong): start them again."""
    while model.lost_counters:
        start_counter(cache, model, model.lost_counters.pop(), known=not model.keys_move)


def start_counter(cache: Any, model: Model, key: str, known: bool) -> None:
    """Set a counter to its band's start; its value is then ``known``, unless the set failed."""
    band = model.bands[key]
    try:
        cache.set(key, band, None)
    except Exception:
        model.counters[key] = None
    else:
        model.counters[key] = (band, band) if known else None


def check_everything(cache: Any, model: Model, operation: str) -> None:
    """Read every key and counter back, uninterrupted, one by one and all at once."""
    keys = [*model.keys, *model.counters]
    model.check_many(keys, cache.get_many(keys), f"{operation} get_many")
    for key in keys:
        model.check(key, cache.get(key), f"{operation} get")


def check_pools(cache: Any, tally: Tally, where: str) -> None:
    """
    Every client a pool opened is idle again: nothing lent, nothing leaked. A client lost by
    an interrupted call may sit in a reference cycle (an exception kept in a frame of its own
    traceback) until the collector runs: the pool counts on that, so the check does too.
    """
    gc.collect()
    for pool in cache._cache.pools:
        idle = len(pool._idle)
        if pool.open_count != idle:
            tally.leaked_clients += pool.open_count - idle
            tally.note(f"leak: {where}: {pool.node.hostname}: {pool.open_count} open, {idle} idle")


POOL_SIZE = 4
"""Clients (sync) or TLS connections (async) per node: few, so that callers wait for one."""


CHURN_REFRESH = 0.2
"""Seconds between two discoveries while the node list changes all along."""


def cache_options(backend: str, tls_context: Any, churning: bool = False) -> dict[str, Any]:
    """Short timeouts, so that stalled nodes cost little time; small pools; TLS when given;
    frequent discoveries while the node list changes."""
    milliseconds = int(OPERATION_TIMEOUT * 1000)
    options: dict[str, Any] = {"POOL_SIZE": POOL_SIZE}
    if churning:
        options["REFRESH_INTERVAL"] = CHURN_REFRESH
    if backend == "pylibmc":
        options["behaviors"] = {"connect_timeout": milliseconds, "_poll_timeout": milliseconds}
        return options
    options.update(connect_timeout=OPERATION_TIMEOUT, timeout=OPERATION_TIMEOUT)
    if tls_context is not None:
        options["TLS"] = tls_context
    return options


# Running operations under interrupts


def random_delay(rng: random.Random, stalled: bool) -> float | None:
    """When to interrupt a call (s), from inside its first bytecodes to well after it; None:
    not at all. Most fall within a loopback call's few hundred microseconds."""
    draw = rng.random()
    if draw < 0.05:
        return None
    if draw < 0.75:
        return rng.uniform(1e-6, 8e-4)
    if draw < 0.95 or stalled:
        return rng.uniform(8e-4, 2e-2)
    return rng.uniform(2e-2, 2 * OPERATION_TIMEOUT)


CALL_BOUND = 3 * OPERATION_TIMEOUT + 1.0 + LATE_MARGIN
"""Longest a sync call may take: a timeout per node of a batch, a wait for a pooled client
(``pool.BORROW_TIMEOUT``), and the margin."""


def perform(
    cache: Any,
    operation: Operation,
    tally: Tally,
    interruption: Any,
    interrupts: tuple[type[BaseException], ...],
    count_interrupts: bool = False,
) -> None:
    """
    Run one operation inside ``interruption`` (a context manager that may interrupt it with
    one of ``interrupts``) and update the model with what came of it.
    """
    started = time.monotonic()
    try:
        with interruption:
            result = operation.call(cache)
    except interrupts:
        tally.interrupts += count_interrupts
        operation.unknown()
    except Exception as error:
        tally.count_error(operation.name, error)
        operation.failed(error)
    else:
        operation.completed(result)
    finally:
        tally.finished(operation.name, started, CALL_BOUND)


def check_when_back(
    cache: Any, model: Model, tally: Tally, operation: str, wait: float = 10.0
) -> None:
    """``check_everything`` once the nodes answer again (a node marked down is retried after
    ``pool.RETRY_AFTER``), waiting up to ``wait`` seconds; a node that never answers again
    is a failure of its own."""
    deadline = time.monotonic() + wait
    while True:
        try:
            check_everything(cache, model, operation)
            reseed_lost_counters(cache, model)
            return
        except Exception as error:
            if time.monotonic() > deadline:
                if wait:
                    tally.record(
                        "wrong",
                        f"{operation}: nodes never answered again: {error!r} "
                        f"({refresh_state(cache)})",
                    )
                return
            time.sleep(0.1)


def refresh_state(cache: Any) -> str:
    """Where the node list's refreshes stand, for a report of nodes that never came back."""
    topology = cache._topology
    now = topology._clock()
    return (
        f"list version {topology._held().version} of {len(topology._held().nodes)} nodes; "
        f"a refresh counted as running for {max(topology._refreshing_until - now, 0):.1f} s "
        f"more, the next due in {topology._next_refresh - now:.1f} s; last endpoint error: "
        f"{topology.last_error!r}"
    )
