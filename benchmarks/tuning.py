"""
Candidate pylibmc settings for our backend, each timed against our current defaults.

Two instances of the very same backend differ by several per cent on this kind of machine
(connections, buffers, where in the round they run), so a control, a second instance with
the current defaults, is timed like any candidate: its largest gap from the reference, or
``ADOPT_AT`` if larger, is the bar. A candidate is adopted only if it clears that bar over
the operations it can affect (geometric mean, so no single operation decides), is slower
by less than the bar on every one of them, and costs nothing in correctness or behaviour
on a real cluster; that last condition is written next to each candidate, because a
loopback benchmark cannot measure it.
"""

from __future__ import annotations

import pickle
import random
import statistics
import timeit
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from backends import Calls
from stats import geometric_mean

ADOPT_AT = 1.10
"""Smallest speed-up worth a change of default, however quiet the control: every candidate
is a separate client, and separate clients of identical settings have differed by up to 8%
on one operation here even when the control happened to agree with the reference."""

PICKLE_PROTOCOLS = (-1, 4, 2)
"""pylibmc's default (-1, the highest) and the candidates, for the pickling-only figures."""
PICKLE_SECONDS = 0.03

ROUND_TRIP_VALUES = 1000
ROUND_TRIP_BATCH = 50
ROUND_TRIP_MAX_EXPONENT = 5.5
"""Values are up to 10**5.5 bytes (about 316 KB), log-uniformly, so most are small."""


@dataclass(frozen=True)
class Candidate:
    """
    Options for our backend; ``caveat`` is what adopting them would cost beyond speed
    (empty if nothing); ``objects_only`` for settings that touch only pickled values;
    ``control`` for the second instance of the reference, which measures the noise.
    """

    name: str
    options: Mapping[str, Any]
    caveat: str
    objects_only: bool = False
    control: bool = False

    def affects(self, case_name: str) -> bool:
        return not self.objects_only or case_name.endswith(" object")

    @property
    def pickle_protocol(self) -> int | None:
        return self.options.get("behaviors", {}).get("pickle_protocol")


REFERENCE = "current defaults"
BINARY = "binary protocol"

OURS_TEXT = "ours, text protocol"
OURS_BINARY = "ours, binary protocol"
STOCK_TEXT = "stock PyLibMCCache, text protocol"
"""The round trips made: binary against text, and ours against Django's own backend."""

CANDIDATES: tuple[Candidate, ...] = (
    Candidate(REFERENCE, {}, ""),
    Candidate("control: defaults again", {}, "", control=True),
    Candidate(
        "tcp_nodelay off",
        {"behaviors": {"tcp_nodelay": False}},
        "with Nagle's algorithm a write's last partial packet waits for an acknowledgement "
        "the peer may delay by tens of milliseconds",
    ),
    Candidate(
        "no_block on",
        {"behaviors": {"no_block": True}},
        "a failed set would go unnoticed, and Django could not drop the stale value",
    ),
    Candidate(BINARY, {"binary": True}, "memcached deprecates the binary protocol"),
    Candidate(
        "modula distribution",
        {"behaviors": {"ketama": False}},
        "a node added or removed would remap almost every key",
    ),
    Candidate("pickle_protocol 4", {"behaviors": {"pickle_protocol": 4}}, "", objects_only=True),
    Candidate("pickle_protocol 2", {"behaviors": {"pickle_protocol": 2}}, "", objects_only=True),
)


def bar(control_ratios: Mapping[str, float]) -> float:
    """The speed-up a candidate must show: the control's largest gap, at least ADOPT_AT."""
    gaps = [max(ratio, 1 / ratio) for ratio in control_ratios.values()]
    return max([ADOPT_AT, *gaps])


def decide(
    candidate: Candidate,
    ratios: Mapping[str, float],
    needed: float,
    round_trip_ok: bool = True,
    pickled_bytes: Mapping[str, int] | None = None,
) -> str:
    """
    The decision and every reason for it, in one line for the report. ``ratios`` are the
    candidate's speeds relative to the defaults on the operations it can affect, ``needed``
    the bar they must clear; ``pickled_bytes`` the size of the object case's value by
    protocol, which unlike a timing is exact.
    """
    if candidate.control:
        return f"the same settings as the reference: its largest gap sets the bar, {needed:.2f}x"
    reasons = []
    if not round_trip_ok:
        reasons.append("values came back different from the text protocol's")
    overall = geometric_mean(list(ratios.values()))
    if overall < needed:
        reasons.append(f"{overall:.2f}x overall, under the {needed:.2f}x bar")
    slowest = min(ratios, key=ratios.__getitem__)
    if ratios[slowest] < 1 / needed:
        reasons.append(f"{1 / ratios[slowest]:.2f}x slower on {slowest}")
    protocol = candidate.pickle_protocol
    if pickled_bytes and protocol is not None:
        size, default = pickled_bytes[str(protocol)], pickled_bytes["-1"]
        if size == default:
            reasons.append("it pickles the object to the very bytes the default does")
        elif size > default:
            reasons.append(f"it pickles the object {size / default - 1:.0%} larger")
    if candidate.caveat:
        reasons.append(candidate.caveat)
    return "keep current default: " + "; ".join(reasons) if reasons else "adopt"


def mixed_values(count: int, seed: int) -> Iterator[object]:
    """Values of every type pylibmc stores its own way, and pickled ones, of mixed sizes."""
    rng = random.Random(seed)
    for _ in range(count):
        size = int(10 ** rng.uniform(0, ROUND_TRIP_MAX_EXPONENT))
        kind = rng.randrange(9)
        if kind == 0:
            yield rng.randbytes(size)
        elif kind == 1:
            yield "".join(rng.choice("aé€😀 \n") for _ in range(min(size, 20000)))
        elif kind == 2:
            yield rng.choice([0, 1, -1, 2**31, -(2**63), 2**64 + 1, rng.randrange(-size, size)])
        elif kind == 3:
            yield rng.choice([0.0, -1.5, 1e300, rng.random()])
        elif kind == 4:
            yield rng.choice([True, False, None])
        elif kind == 5:
            yield {f"k{i}": rng.randbytes(8) for i in range(max(1, size // 30))}
        elif kind == 6:
            yield [rng.random() for _ in range(max(1, size // 10))]
        elif kind == 7:
            yield (size, "tuple", b"\x00" * min(size, 1000))
        else:
            yield bytearray(rng.randbytes(size))


def round_trip(calls: Calls, count: int = ROUND_TRIP_VALUES, seed: int = 0) -> dict[str, Any]:
    """
    Write ``count`` values through the backend and read each back: how many came back
    equal and of the same type, and what the first few that did not were.
    """
    values = list(mixed_values(count, seed))
    mismatches = []
    for start in range(0, count, ROUND_TRIP_BATCH):
        batch = {
            f"bench:rt:{start + i}": value
            for i, value in enumerate(values[start : start + ROUND_TRIP_BATCH])
        }
        calls.set_many(batch)
        found = calls.get_many(list(batch))
        for key, value in batch.items():
            got = found.get(key, KeyError)
            if type(got) is not type(value) or got != value:
                mismatches.append(f"{type(value).__name__} -> {type(got).__name__}")
    return {
        "values": count,
        "identical": count - len(mismatches),
        "mismatches": sorted(set(mismatches))[:10],
    }


def pickling(value: object, rounds: int) -> dict[str, dict[str, float]]:
    """
    The size of ``value`` pickled at each protocol, and the microseconds to pickle and
    unpickle it, as pylibmc does for a value that is not bytes, str or int: the whole of
    what ``pickle_protocol`` can change, without the network that drowns it end to end.
    The size is exact; the time is as noisy as the machine.
    """
    statements = {
        protocol: f"pickle.loads(pickle.dumps(value, {protocol}))" for protocol in PICKLE_PROTOCOLS
    }
    space = {"pickle": pickle, "value": value}
    trial = timeit.Timer(statements[-1], globals=space).timeit(10) / 10
    number = max(10, round(PICKLE_SECONDS / max(trial, 1e-9)))
    samples: dict[int, list[float]] = {protocol: [] for protocol in PICKLE_PROTOCOLS}
    order = list(statements.items())
    for round_index in range(rounds):
        rotation = round_index % len(order)
        for protocol, statement in order[rotation:] + order[:rotation]:
            elapsed = timeit.Timer(statement, globals=space).timeit(number)
            samples[protocol].append(elapsed / number * 1e6)
    return {
        "bytes": {str(p): len(pickle.dumps(value, p)) for p in PICKLE_PROTOCOLS},
        "us": {str(p): statistics.median(values) for p, values in samples.items()},
    }
