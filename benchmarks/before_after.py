"""
This checkout's pylibmc backend against the same backend at an earlier commit, side by side
in one process on one 3-node ``LocalCluster``, beside Django's stock ``PyLibMCCache`` and raw
pylibmc: single ``get`` and ``set``, ``get_many(20)`` and the mixed workload, timed in
``hotpaths``' turns over keys that every contender places on the same node, and
``set_many`` of small and of large values (without raw pylibmc: its ``set_multi`` takes a
round trip per key); and ``aget``
awaited one after another against ``get``, as ``request_cycle`` times it, the two versions in
alternate rounds.

Timed in separate runs, two versions differ by the machine's drift as much as by their code;
here every contender of a comparison takes turns within each round. The earlier commit is
exported (``git archive``) into a temporary directory, its compiled loops built there, and
imported as another package, ``django_elasticache_before``: the package imports itself
relatively, so both copies run at once, each with its own topology and pools.

Run: ``python benchmarks/before_after.py <commit>`` (add ``--rounds N``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from backends import DJANGO_KEY_PREFIX, DJANGO_TIMEOUT, build_ours, build_stock, our_behaviors
from hotpaths import (
    GET_MANY_20,
    MIXED,
    MIXED_BATCH,
    RAW,
    SET_MANY,
    SINGLE_GET,
    SINGLE_SET,
    STOCK,
    VALUE,
    Call,
    agreeing_keys,
    cycling,
    measure,
    mixed,
    raw_client,
    rows,
)
from request_cycle import AGET_KEYS, sequential
from stats import micros, quartiles
from tables import Table
from workloads import rotated

from django_elasticache.testing import LocalCluster

SET_MANY_LARGE = "set_many(10) x 500 KB"
LARGE_VALUE = bytes(range(256)) * 1953  # 499,968 bytes that do not compress to nothing

NOW = "ours, this checkout"
BEFORE = "ours, before"
HEADER = ["comparison", "contender", "µs per call", "this checkout's time / its time"]
AGET_HEADER = ["contender", "get µs", "aget µs", "aget / get", "quartiles"]


def import_before(commit: str, directory: Path) -> Any:
    """The package at ``commit``, built in ``directory``, as ``django_elasticache_before``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "archive", commit, "django_elasticache", "setup.py", "pyproject.toml"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    built = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "-q"],
        cwd=directory,
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise SystemExit(f"the compiled loops of {commit} did not build:\n{built.stderr}")
    (directory / "django_elasticache").rename(directory / "django_elasticache_before")
    sys.path.insert(0, str(directory))
    return importlib.import_module("django_elasticache_before.memcached")


def comparisons(cluster: LocalCluster, before_module: Any) -> dict[str, dict[str, Call]]:
    """Each comparison's contenders, this checkout's first."""
    now = build_ours(cluster, {})
    before = before_module.ElastiCache(cluster.location, {"OPTIONS": {}})
    stock = build_stock(cluster, our_behaviors())
    raw = raw_client(cluster)
    keys = agreeing_keys(now, raw, cluster)
    ready = [DJANGO_KEY_PREFIX + key for key in keys]
    for cache in (now, before):
        cache.set_many(dict.fromkeys(keys, VALUE))
    batches = [keys[start : start + MIXED_BATCH] for start in range(0, len(keys), MIXED_BATCH)]
    ready_batches = [[DJANGO_KEY_PREFIX + key for key in batch] for batch in batches]
    caches = {NOW: now, BEFORE: before, STOCK: stock}

    def each(make: Any, raw_call: Call) -> dict[str, Call]:
        return {**{name: make(cache) for name, cache in caches.items()}, RAW: raw_call}

    def set_on(cache: Any) -> Call:
        return cycling(functools.partial(cache.set, value=VALUE), keys)

    raw_set = cycling(functools.partial(raw.set, val=VALUE, time=DJANGO_TIMEOUT), ready)
    raw_get, raw_get_many = cycling(raw.get, ready), cycling(raw.get_multi, ready_batches)
    large = {f"large-{index}": LARGE_VALUE for index in range(10)}
    return {
        SINGLE_GET: each(lambda cache: cycling(cache.get, keys), raw_get),
        SINGLE_SET: each(set_on, raw_set),
        GET_MANY_20: each(lambda cache: cycling(cache.get_many, batches), raw_get_many),
        MIXED: each(
            lambda cache: mixed(
                set_on(cache), cycling(cache.get, keys), cycling(cache.get_many, batches)
            ),
            mixed(raw_set, raw_get, raw_get_many),
        ),
        SET_MANY: {
            name: functools.partial(cache.set_many, dict.fromkeys(keys, VALUE))
            for name, cache in caches.items()
        },
        SET_MANY_LARGE: {
            name: functools.partial(cache.set_many, large) for name, cache in caches.items()
        },
    }


def aget_rounds(
    cluster: LocalCluster, before_module: Any, rounds: int
) -> dict[str, list[tuple[float, float]]]:
    """Per version and round, seconds per ``get`` and per ``aget`` (``request_cycle``'s way)."""
    keys = [f"bench:aget:{index}" for index in range(AGET_KEYS)]
    caches = {
        NOW: build_ours(cluster, {}),
        BEFORE: before_module.ElastiCache(cluster.location, {}),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in caches}
    loop = asyncio.new_event_loop()
    try:
        for cache in caches.values():
            cache.set_many(dict.fromkeys(keys, VALUE))
            sequential(cache, keys, loop)  # Connections opened, code paths warmed.
        for round_index in range(rounds):
            for name in rotated(list(caches), round_index):
                samples[name].append(sequential(caches[name], keys, loop))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return samples


def aget_rows(samples: dict[str, list[tuple[float, float]]]) -> list[list[str]]:
    table = []
    for name, pairs in samples.items():
        ratios = [awaited / sync for sync, awaited in pairs]
        low, high = quartiles(ratios)
        table.append(
            [
                name,
                f"{micros([sync for sync, _ in pairs]):.1f}",
                f"{micros([awaited for _, awaited in pairs]):.1f}",
                f"{statistics.median(ratios):.2f}x",
                f"{low:.2f}-{high:.2f}",
            ]
        )
    now, before = ([awaited for _, awaited in samples[name]] for name in (NOW, BEFORE))
    ratio = statistics.median(a / b for a, b in zip(now, before, strict=True))
    table.append([f"{NOW}'s aget time / {BEFORE}'s", "", "", f"{ratio:.3f}x", ""])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commit")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--calls", type=int, default=200)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, LocalCluster(relay=False) as cluster:
        before_module = import_before(arguments.commit, Path(directory))
        contenders = comparisons(cluster, before_module)
        measure(contenders, 1, 20)  # Connections opened, code paths warmed.
        seconds = measure(contenders, arguments.rounds, arguments.calls)
        awaited = aget_rounds(cluster, before_module, arguments.rounds)
    figures = {"seconds": seconds}
    print(f"this checkout against {arguments.commit}, {arguments.rounds} rounds")
    print(Table.of(HEADER, rows(figures)).text())
    print(Table.of(AGET_HEADER, aget_rows(awaited)).text())


if __name__ == "__main__":
    main()
