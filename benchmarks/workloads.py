"""
The operations timed, and the interleaved rounds that time them.

Each measurement is a fixed number of calls of one operation by one contender, timed with
``time.perf_counter`` with the garbage collector off (as ``timeit`` does), so a collection
the previous measurement caused is not billed to the next one. The number of calls is
chosen once per operation and contender, the same in every round, from a short
calibration: enough calls to take about ``target`` seconds, within fixed bounds, so that a
contender a hundred times slower leaves the others more than a handful of calls. Rounds
visit the contenders in a rotated order (A B C, B C A, C A B, ...), so that none is always
first after a slow preparation or always last before one; a slower stretch of the shared
machine then lands on all of them, which is what makes per-round ratios worth reading.
Every single-key operation cycles over many keys: over loopback on a small machine one
node may answer in 20 µs and another in 70 µs (whether its memcached thread shares the
client's CPU), and contenders that place keys differently would otherwise time
different nodes.
"""

from __future__ import annotations

import functools
import gc
import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from backends import Calls

T = TypeVar("T")

CALIBRATION_SECONDS = 0.005
"""A calibration run stops growing once it takes this long."""

CALIBRATION_STEPS = 6
MIN_CALLS = 3
MAX_CALLS = 5000
BATCH_SIZE_FOR_SETUP = 10
"""Keys per set_many when filling pools, small enough for 10 values of 500 KB."""

COUNTER_KEYS = [f"bench:counter:{i}" for i in range(30)]
"""Counters over every node: one would time whichever node each contender places it on."""
DELETE_VALUE = b"d"

KB = 1024
SIZES = (100, 10 * KB, 500 * KB)
MAX_BATCH_BYTES = 5 * KB * KB


@dataclass(frozen=True)
class Case:
    """
    One operation to time: ``op`` on values of ``size`` bytes (None: the operation takes
    no value), ``batch`` keys per call for the batch operations; "mixed" is one ``set``, one
    ``get`` and one ``get_many`` of ``batch`` keys per call.
    """

    op: str
    size: int | None = None
    batch: int = 1

    @property
    def name(self) -> str:
        if self.op == "mixed":
            op = f"set + get + get_many({self.batch})"
        elif self.op in ("get_many", "set_many", "delete_many"):
            op = f"{self.op}({self.batch})"
        else:
            op = self.op
        if self.size is None:
            return op
        return f"{op} {format_size(self.size)}"

    @property
    def pool_size(self) -> int:
        """Distinct keys the case reads or writes: a hundred, or ten of the big values."""
        return 10 if (self.size or 0) >= 100 * KB else 100


def format_size(size: int) -> str:
    if size >= KB:
        return f"{size // KB} KB"
    return f"{size} B"


def value_for(size: int) -> bytes:
    """Bytes that do not compress, the same for every contender."""
    return random.Random(size).randbytes(size)


@dataclass
class Pools:
    """
    The stored values of each size, under keys that every contender reads.
    ``pipelined`` False stores them one ``set`` at a time: memcached's TLS connections can
    stall on a burst of pipelined sets (see ``django_elasticache.pipeline``).
    """

    values: dict[int, bytes] = field(default_factory=dict)
    pipelined: bool = True

    def value(self, size: int) -> bytes:
        if size not in self.values:
            self.values[size] = value_for(size)
        return self.values[size]

    @staticmethod
    def keys(size: int, count: int) -> list[str]:
        return [f"bench:bytes:{size}:{i}" for i in range(count)]

    def fill(self, case: Case, calls: Calls) -> None:
        """
        Store the case's pool through the contender itself (each places keys its own way)
        and read it back: a missing value means memcached evicted it, and a get "hit"
        would then time misses.
        """
        if case.size is None:
            return
        value = self.value(case.size)
        keys = [calls.key(key) for key in self.keys(case.size, case.pool_size)]
        if self.pipelined:
            for chunk in batched(keys, BATCH_SIZE_FOR_SETUP):
                calls.set_many(dict.fromkeys(chunk, value))
        else:
            for key in keys:
                calls.set(key, value)
        found = calls.get_many(keys)
        if len(found) != len(keys) or any(found[key] != value for key in keys):
            raise RuntimeError(f"{case.name}: {len(keys) - len(found)} values did not stay")


def batched(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """The items from the round's turn on, then the ones before: A B C, B C A, C A B, ..."""
    turn = round_index % len(items)
    return [*items[turn:], *items[:turn]]


def cycle(items: Sequence[object], count: int) -> list:
    return list(itertools.islice(itertools.cycle(items), count))


def _time_each(call: Callable, args: list) -> float:
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for arg in args:
            call(arg)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def _time_each_with(call: Callable, args: list, value: object) -> float:
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for arg in args:
            call(arg, value)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def _mixed(calls: Calls, value: object, step: tuple[str, str, list[str]]) -> None:
    written, read, batch = step
    calls.set(written, value)
    calls.get(read)
    calls.get_many(batch)


def prepare(case: Case, calls: Calls, count: int, pools: Pools) -> Callable[[], float]:
    """
    Do the untimed setup for ``count`` calls of the case, and return the timed part: a
    function that makes the calls and returns the seconds they took.
    """
    if case.op == "get_miss":
        keys = [calls.key(f"bench:miss:{i}") for i in range(min(count, 1000))]
        args = cycle(keys, count)
        return lambda: _time_each(calls.get, args)
    if case.op == "incr":
        keys = [calls.key(key) for key in COUNTER_KEYS]
        for key in keys:
            calls.set(key, 0)
        args = cycle(keys, count)
        return lambda: _time_each(calls.incr, args)
    if case.op in ("delete", "delete_many"):
        keys = [calls.key(f"bench:delete:{i}") for i in range(count * case.batch)]
        for chunk in batched(keys, 100):
            calls.set_many(dict.fromkeys(chunk, DELETE_VALUE))
        if case.op == "delete":
            return lambda: _time_each(calls.delete, keys)
        return lambda: _time_each(calls.delete_many, batched(keys, case.batch))
    if case.size is None:
        raise ValueError(f"{case.name}: {case.op} needs a value size")
    value = pools.value(case.size)
    pool = [calls.key(key) for key in pools.keys(case.size, case.pool_size)]
    if case.op == "get":
        args = cycle(pool, count)
        return lambda: _time_each(calls.get, args)
    if case.op == "set":
        args = cycle(pool, count)
        return lambda: _time_each_with(calls.set, args, value)
    batches = cycle(batched(pool, case.batch), count)
    if case.op == "get_many":
        return lambda: _time_each(calls.get_many, batches)
    if case.op == "set_many":
        mappings = [dict.fromkeys(keys, value) for keys in batches]
        return lambda: _time_each(calls.set_many, mappings)
    if case.op == "mixed":
        steps = list(zip(cycle(pool, count), cycle(pool[::-1], count), batches, strict=True))
        return lambda: _time_each(functools.partial(_mixed, calls, value), steps)
    raise ValueError(f"unknown operation {case.op!r}")


def seconds_per_call(case: Case, calls: Calls, pools: Pools) -> float:
    """A rough cost of one call, from runs that grow until one lasts a few milliseconds."""
    count = MIN_CALLS
    elapsed = 0.0
    for _ in range(CALIBRATION_STEPS):
        elapsed = prepare(case, calls, count, pools)()
        if elapsed >= CALIBRATION_SECONDS or count >= MAX_CALLS:
            break
        count = min(count * 4, MAX_CALLS)
    return elapsed / count


def calls_per_measurement(per_call: float, target: float) -> int:
    """As many calls as take about ``target`` seconds, within fixed bounds."""
    return max(MIN_CALLS, min(MAX_CALLS, round(target / max(per_call, 1e-9))))


class Deadline:
    """A limit on the whole run, checked between measurements."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self, doing: str) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError(f"benchmark exceeded its {self.seconds:.0f} s limit during {doing}")


@dataclass
class Measurements:
    """Seconds per call of every case and contender, one entry per round, and the number
    of calls each contender's measurements of each case made."""

    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    calls: dict[str, dict[str, int]] = field(default_factory=dict)


def measure(
    cases: Sequence[Case],
    contenders: Mapping[str, Calls],
    rounds: int,
    target: float,
    deadline: Deadline,
    pipelined_setup: bool = True,
) -> Measurements:
    """Fill the pools, calibrate each case, then run the interleaved rounds."""
    pools = Pools(pipelined=pipelined_setup)
    result = Measurements()
    for case in cases:
        for calls in contenders.values():
            pools.fill(case, calls)
        result.calls[case.name] = {
            name: calls_per_measurement(seconds_per_call(case, calls, pools), target)
            for name, calls in contenders.items()
        }
        result.seconds[case.name] = {name: [] for name in contenders}
        deadline.check(f"calibration of {case.name}")
    order = list(contenders.items())
    for round_index in range(rounds):
        gc.collect()
        for case in cases:
            for name, calls in rotated(order, round_index):
                count = result.calls[case.name][name]
                timed = prepare(case, calls, count, pools)
                result.seconds[case.name][name].append(timed() / count)
            deadline.check(f"round {round_index + 1} of {case.name}")
    return result


def main_cases() -> list[Case]:
    """Every operation, on values of 100 B, 10 KB and 500 KB where it takes values.

    Batches above ``MAX_BATCH_BYTES`` are left out: the hundred values of 500 KB would be
    more than the 16 MB nodes of a LocalCluster hold, and no page fetches that much in one
    cache call.
    """
    cases = [Case("get", size) for size in SIZES] + [Case("get_miss")]
    cases += [Case("set", size) for size in SIZES]
    for op in ("get_many", "set_many"):
        for batch in (10, 100):
            cases += [Case(op, size, batch) for size in SIZES if size * batch <= MAX_BATCH_BYTES]
    return [*cases, Case("incr"), Case("delete")]


def scaling_cases() -> list[Case]:
    return [Case("get_many", 100, 100), Case("get_many", 10 * KB, 100)]


def tls_cases() -> list[Case]:
    """Single-key operations of every size, and the 100-key batches: where TLS could cost."""
    cases = [Case("get", size) for size in SIZES] + [Case("get_miss")]
    cases += [Case("set", size) for size in SIZES]
    cases += [Case("get_many", 100, 100), Case("get_many", 10 * KB, 100)]
    return [*cases, Case("set_many", 100, 100), Case("incr"), Case("delete")]
