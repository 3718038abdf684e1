"""
This checkout's hot paths against another revision's, side by side in one run.

``python benchmarks/versus.py --base REV [--rounds 9] [--calls 300]`` extracts ``REV`` (any
git revision: a commit, ``main``, ``HEAD~3``) into a temporary directory and starts one
worker process on it and one on this checkout, both against the same three-node
``LocalCluster``. The worker on this checkout also times Django's stock ``PyLibMCCache`` and
raw pylibmc over the same nodes. Every round times each contender for ``calls`` calls of
each operation, in turn, so load on the machine hits all alike; a time is the median over
rounds, a ratio the median of per-round ratios (above 1: this checkout is faster).

A change that buys a guarantee must not cost the hot paths their speed, and a speed-up must
not cost a guarantee: this is the script that shows the first half, for a change's note.
Each worker imports its own ``django_elasticache`` (``PYTHONPATH``), which one process
could not do. Workers are children that die with this process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

KEYS = [f"versus-{index}" for index in range(100)]
VALUE = "v" * 100
MIXED_BATCH = 20
OPERATIONS = ("get", "set", "get_many(20)", "get_many(100)", "mixed", "aget")
"""
``mixed`` is ``set`` + ``get`` + ``get_many(20)``: the calls a Django page makes. ``aget`` is
awaited one call after another on an event loop, cycling over the keys as ``get`` does (raw
pylibmc has none; Django's stock ``aget`` is a thread hop to ``get``).
"""

BASE, OURS, STOCK, RAW = "base", "this checkout", "stock PyLibMCCache", "raw pylibmc"


def workload(
    calls: Any, operation: str, count: int, aget: Callable[[str], Any] | None = None
) -> Callable[[], None] | None:
    """
    ``count`` calls of ``operation`` through ``calls``, cycling over ``KEYS``; ``None`` for
    ``aget`` without an ``aget`` to call.
    """
    import asyncio

    from workloads import cycle

    keys = [calls.key(key) for key in cycle(KEYS, count)]
    batch = max(1, count // 5)
    blocks = [
        [calls.key(key) for key in cycle(KEYS[start:] + KEYS[:start], size)]
        for start in range(0, len(KEYS), 7)
        for size in (MIXED_BATCH, 100)
    ]
    small = [block for block in blocks if len(block) == MIXED_BATCH]
    large = [block for block in blocks if len(block) == 100]
    get, set_, get_many = calls.get, calls.set, calls.get_many
    if operation == "aget":
        if aget is None:
            return None
        loop = asyncio.new_event_loop()

        async def awaited() -> None:
            for key in keys:
                await aget(key)

        return lambda: loop.run_until_complete(awaited())

    def run() -> None:
        if operation == "get":
            for key in keys:
                get(key)
        elif operation == "set":
            for key in keys:
                set_(key, VALUE)
        elif operation == "get_many(20)":
            for index in range(count):
                get_many(small[index % len(small)])
        elif operation == "get_many(100)":
            for index in range(batch):
                get_many(large[index % len(large)])
        else:
            for index, key in enumerate(keys):
                set_(key, VALUE)
                get(key)
                get_many(small[index % len(small)])

    return run


def serve(spec: dict[str, Any], with_references: bool) -> None:
    """The worker: build the contenders, then time what the driver asks, line by line."""
    import time

    import pylibmc
    from backends import Addresses, build_ours, build_stock, django_calls, our_behaviors, raw_calls

    cluster = Addresses(spec["location"], spec["node_addresses"])
    behaviors = our_behaviors()
    caches = {OURS: build_ours(cluster, behaviors)}
    if with_references:
        caches[STOCK] = build_stock(cluster, behaviors)
    contenders = {name: django_calls(cache) for name, cache in caches.items()}
    if with_references:
        contenders[RAW] = raw_calls(pylibmc.Client(cluster.node_addresses, behaviors=behaviors))
    for calls in contenders.values():
        calls.set_many({calls.key(key): VALUE for key in KEYS})
    runs = {
        (name, operation): workload(
            calls, operation, spec["calls"], getattr(caches.get(name), "aget", None)
        )
        for name, calls in contenders.items()
        for operation in OPERATIONS
    }
    print(json.dumps(sorted(contenders)), flush=True)
    for line in sys.stdin:
        name, operation = json.loads(line)
        run = runs[name, operation]
        if run is None:
            print(json.dumps(None), flush=True)
            continue
        start = time.perf_counter()
        run()
        print(json.dumps(time.perf_counter() - start), flush=True)


class Worker:
    """A worker process on one source tree, asked to time one contender at a time."""

    def __init__(self, tree: Path, spec: dict[str, Any], with_references: bool) -> None:
        from django_elasticache.testing.processes import spawn

        command = [sys.executable, str(HERE / "versus.py"), "--worker", json.dumps(spec)]
        if with_references:
            command.append("--with-references")
        environment = {**os.environ, "PYTHONPATH": str(tree)}
        self._process = spawn(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment
        )
        self.contenders: list[str] = json.loads(self._readline())

    def time(self, name: str, operation: str) -> float | None:
        """Seconds for the calls; ``None`` if the contender has no such operation."""
        stdin: IO[bytes] = self._process.stdin  # type: ignore[assignment]
        stdin.write(json.dumps([name, operation]).encode() + b"\n")
        stdin.flush()
        seconds = json.loads(self._readline())
        return None if seconds is None else float(seconds)

    def _readline(self) -> str:
        stdout: IO[bytes] = self._process.stdout  # type: ignore[assignment]
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"a benchmark worker exited with {self._process.wait()}")
        return line.decode()

    def close(self) -> None:
        self._process.kill()
        self._process.wait()


def extract(revision: str, into: Path) -> Path:
    """
    The package as it was at ``revision``, as files under ``into``, with its compiled part
    built where the revision has one (as this checkout's is): otherwise a compiled checkout
    would be timed against a pure-Python one.
    """
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", revision, "setup.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "django_elasticache", *listed],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    if listed:
        subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace", "-q"],
            cwd=into,
            check=True,
            capture_output=True,
        )
    return into


def report(times: dict[tuple[str, str], list[float]], calls: int) -> str:
    lines = [
        f"{'operation':<14} {'contender':<20} {'µs/call':>9} {'this checkout is':>18}",
    ]
    for operation in OPERATIONS:
        per_call = calls // 5 if operation == "get_many(100)" else calls
        ours = times[OURS, operation]
        for name in (OURS, BASE, STOCK, RAW):
            if (name, operation) not in times:
                continue
            seconds = times[name, operation]
            micros = statistics.median(seconds) / per_call * 1e6
            ratios = [theirs / mine for mine, theirs in zip(ours, seconds, strict=True)]
            first, _, third = statistics.quantiles(ratios, n=4)
            versus = (
                ""
                if name == OURS
                else (f"{statistics.median(ratios):.2f}x ({first:.2f}-{third:.2f})")
            )
            lines.append(f"{operation:<14} {name:<20} {micros:>9.1f} {versus:>18}")
    for name in (OURS, BASE):
        ratios = [
            awaited / called
            for awaited, called in zip(times[name, "aget"], times[name, "get"], strict=True)
        ]
        first, median, third = statistics.quantiles(ratios, n=4)
        lines.append(f"aget / get, {name}: {median:.2f}x ({first:.2f}-{third:.2f})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--calls", type=int, default=300, help="calls per round (get_many(100): a fifth)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--with-references", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        serve(json.loads(args.worker), args.with_references)
        return 0
    if args.rounds < 2 or args.calls < 5:
        raise SystemExit("--rounds must be at least 2 and --calls at least 5")
    from django_elasticache.testing import LocalCluster

    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch, LocalCluster(nodes=3) as cluster:
        spec = {
            "location": cluster.location,
            "node_addresses": cluster.node_addresses,
            "calls": args.calls,
        }
        base = Worker(extract(args.base, Path(scratch)), spec, with_references=False)
        current = Worker(ROOT, spec, with_references=True)
        try:
            for _ in range(args.rounds):
                for operation in OPERATIONS:
                    for worker, name, label in [
                        (base, OURS, BASE),
                        *((current, name, name) for name in current.contenders),
                    ]:
                        seconds = worker.time(name, operation)
                        if seconds is not None:
                            times.setdefault((label, operation), []).append(seconds)
        finally:
            base.close()
            current.close()
    print(f"base: {args.base}; {args.rounds} rounds of {args.calls} calls")
    print(report(times, args.calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
