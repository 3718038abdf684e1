"""
Django's request cycle and concurrency, on 3-node LocalClusters, for our two backends and
Django's stock ``PyLibMCCache`` / ``PyMemcacheCache`` on the static node list.

    python benchmarks/request_cycle.py           # about 2 minutes on 2 cores
    python benchmarks/request_cycle.py --rounds 3

What a web application does to a cache is not a loop of gets: each request reaches the
backend through ``caches[alias]`` (one instance per thread, or per ASGI request context),
and after it Django's ``request_finished`` signal runs ``close_caches()``, which calls every
backend's ``close()``. This module measures that cycle:

* *request*: 5 gets, then ``close_caches()``, against the same without closing; in
  WSGI-style threads (a pool of 8, each thread with its own ``caches[alias]``) and in
  ASGI-style contexts (each request in its own task and ``ThreadSensitiveContext``, its
  sync code through ``sync_to_async``, as Django's ASGI handler runs a sync view and the
  signal); in clear text and over TLS (the pymemcache backends only: pylibmc has no TLS);
* *connections*: the new connections 400 such requests open after warm-up, from each
  memcached's own ``total_connections``;
* *aget*: ``aget`` one after another against ``get``, same backend and process;
* *concurrency*: 50 ASGI-style requests at once, each writing and reading its own key, and
  the values that came back wrong;
* *crashes*: one backend instance shared by 32 threads, and an instance made at start-up
  then used by 50 ASGI requests, each in a fresh subprocess, since pylibmc aborts the
  whole process when a client is used from two threads at once.

Contenders of one measurement run in the same rounds, in rotated order; ratios are medians
of the per-round ratios (``stats``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import request_report
import tables
import targets
import workloads
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from backends import TIMEOUT_SECONDS, ListedHosts, our_behaviors, static_location
from django.core.cache import caches, close_caches
from django.test.utils import override_settings
from stats import paired, quartiles
from tables import Section
from targets import target_table
from wire import connect

from django_elasticache.cluster_utils import format_address
from django_elasticache.testing import LocalCluster

NODES = 3
ROUNDS = 7
REQUEST_GETS = 5
WSGI_THREADS = 8
ASGI_IN_FLIGHT = 8
"""Requests in progress at once in the ASGI-style runs, as many as the WSGI threads."""
REQUESTS_PER_MEASUREMENT = 64
CONNECTION_REQUESTS = 400
WARM_UP_REQUESTS = 2 * WSGI_THREADS
SEQUENTIAL_BLOCKS = 8
SEQUENTIAL_BLOCK = 25
AGET_KEYS = 25
"""Keys the get/aget comparison cycles over, enough to meet every node of a cluster."""
AGET_ROUNDS_PER_ROUND = 5
"""
Rounds of the get/aget comparison per round of the request cycle: one takes a few tens of
milliseconds against seconds, and with 7 rounds its quartiles spanned 1.39x to 1.86x.
"""
ON_UVLOOP = "_uvloop"
"""Suffix of the get/aget comparison's contenders whose loop is uvloop's."""
CONCURRENT_REQUESTS = 50
SHARING_THREADS = 32
SHARING_ITERATIONS = 100
STARTUP_WAVES = 4
CHILD_TIMEOUT = 120.0
STATS_TIMEOUT = 5.0
VALUE = b"r" * 100

STYLES = ("wsgi", "asgi")
DUMMY = {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}


@dataclass(frozen=True)
class Backend:
    """A backend class and how a user configures it for a cluster."""

    name: str
    label: str
    path: str
    ours: bool
    tls: bool
    """Whether it can speak TLS (the pymemcache-based ones)."""

    def settings(self, cluster: LocalCluster) -> dict[str, Any]:
        """Its ``CACHES`` entry for ``cluster``, TLS if the cluster has it."""
        location: str | list[str] = static_location(cluster)
        options: dict[str, Any]
        if self.ours:
            location = cluster.location
            options = {"TLS": cluster.client_tls_context()} if cluster.tls else {}
        elif not self.tls:
            options = {"behaviors": our_behaviors()}
        else:
            options = {"connect_timeout": TIMEOUT_SECONDS, "timeout": TIMEOUT_SECONDS}
            if cluster.tls:
                # Certificates name the nodes' hostnames, which only ListedHosts resolves.
                location = [format_address(node.hostname, node.port) for node in cluster.nodes]
                options["tls_context"] = cluster.client_tls_context()
                options["socket_module"] = ListedHosts({n.hostname: n.ip for n in cluster.nodes})
        return {"BACKEND": self.path, "LOCATION": location, "OPTIONS": options}


BACKENDS = (
    Backend("ours", "ours (pylibmc)", "django_elasticache.memcached.ElastiCache", True, False),
    Backend(
        "ours_pymemcache",
        "ours (pymemcache)",
        "django_elasticache.pymemcache.ElastiCache",
        True,
        True,
    ),
    Backend(
        "stock",
        "PyLibMCCache",
        "django.core.cache.backends.memcached.PyLibMCCache",
        False,
        False,
    ),
    Backend(
        "pymemcache",
        "PyMemcacheCache",
        "django.core.cache.backends.memcached.PyMemcacheCache",
        False,
        True,
    ),
)
STOCK = "stock"


# Django's request cycle, as a server runs it


def view(alias: str, keys: Sequence[str]) -> list[Any]:
    """What a view does with the cache: reach it through ``caches`` and read."""
    cache = caches[alias]
    return [cache.get(key) for key in keys]


def wsgi_request(alias: str, keys: Sequence[str], close: bool) -> None:
    view(alias, keys)
    if close:
        close_caches()


async def asgi_request(alias: str, keys: Sequence[str], close: bool) -> None:
    """A sync view under Django's ASGI handler: its own thread-sensitive context, the view
    and then ``request_finished`` through ``sync_to_async``."""
    async with ThreadSensitiveContext():
        await sync_to_async(view)(alias, keys)
        if close:
            await sync_to_async(close_caches)()


async def asgi_requests(alias: str, keys: Sequence[str], close: bool, count: int) -> None:
    """``count`` requests, each its own task as an ASGI server makes it, a few at a time."""
    slots = asyncio.Semaphore(ASGI_IN_FLIGHT)

    async def one() -> None:
        async with slots:
            await asgi_request(alias, keys, close)

    await asyncio.gather(*(one() for _ in range(count)))


@dataclass
class Contender:
    """One backend, style and closing policy under its own alias (and WSGI threads, so
    that one contender's ``close_caches()`` never closes another's clients)."""

    alias: str
    backend: Backend
    style: str
    close: bool
    tls: bool
    keys: list[str]
    entry: dict[str, Any]
    """Its ``CACHES`` entry."""
    pool: ThreadPoolExecutor | None = None

    @property
    def name(self) -> str:
        closing = "close" if self.close else "no close"
        return f"{self.backend.name}, {self.style}, {closing}, {'TLS' if self.tls else 'clear'}"

    def run(self, count: int) -> float:
        """Seconds ``count`` requests took. The garbage of the contender before (ASGI
        requests leave a backend instance each) is collected first, not billed to this one."""
        gc.collect()
        only_alias(self.alias, self.entry)
        start = time.perf_counter()
        if self.style == "wsgi":
            assert self.pool is not None
            futures = [
                self.pool.submit(wsgi_request, self.alias, self.keys, self.close)
                for _ in range(count)
            ]
            for future in futures:
                future.result()
        else:
            asyncio.run(asgi_requests(self.alias, self.keys, self.close, count))
        return time.perf_counter() - start


def contenders(clusters: Mapping[bool, LocalCluster]) -> tuple[dict[str, Any], list[Contender]]:
    """Every combination, with its ``CACHES`` entry."""
    settings: dict[str, Any] = {"default": DUMMY}
    made: list[Contender] = []
    for tls, cluster in clusters.items():
        for backend in BACKENDS:
            if tls and not backend.tls:
                continue
            for style in STYLES:
                for close in (True, False):
                    alias = f"c{len(made)}"
                    settings[alias] = backend.settings(cluster)
                    keys = [f"bench:request:{alias}:{i}" for i in range(REQUEST_GETS)]
                    pool = ThreadPoolExecutor(WSGI_THREADS) if style == "wsgi" else None
                    made.append(
                        Contender(alias, backend, style, close, tls, keys, settings[alias], pool)
                    )
    return settings, made


def only_alias(alias: str, entry: dict[str, Any]) -> None:
    """
    Let ``caches`` know of this one alias (and ``default``) while it runs, as a site with
    one cache would have it: ``close_caches()`` walks every configured alias, 50 µs for
    the 25 this module configures against 8 µs for two, which would be billed to closing.
    Instances already made stay, as the handler keeps them in its own ``Local``.
    """
    caches.settings = {"default": DUMMY, alias: entry}


def store_keys(contender: Contender) -> None:
    """The keys a contender reads, stored through an instance of its own backend, which
    places them as it will look for them; never through ``caches``, whose instance would
    be shared by every request that follows."""
    only_alias(contender.alias, contender.entry)
    cache = caches.create_connection(contender.alias)
    cache.set_many(dict.fromkeys(contender.keys, VALUE))
    if len(cache.get_many(contender.keys)) != len(contender.keys):
        raise RuntimeError(f"{contender.name}: the keys did not stay")
    cache.close()


# Connections, from memcached's own count


class NodeStats:
    """One connection per node kept open for ``stats``, so that reading the count adds
    nothing to it between two readings."""

    def __init__(self, cluster: LocalCluster) -> None:
        context = cluster.client_tls_context() if cluster.tls else None
        self._sockets = [connect(node, context, STATS_TIMEOUT) for node in cluster.nodes]

    def total_connections(self) -> list[int]:
        return [int(self._stats(conn)["total_connections"]) for conn in self._sockets]

    @staticmethod
    def _stats(conn: socket.socket | ssl.SSLSocket) -> dict[str, str]:
        conn.sendall(b"stats\r\n")
        reply = b""
        while not reply.endswith(b"END\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("memcached closed the stats connection")
            reply += chunk
        return {
            parts[1]: parts[2]
            for parts in (line.split(" ") for line in reply.decode().splitlines())
            if len(parts) == 3 and parts[0] == "STAT"
        }

    def close(self) -> None:
        for conn in self._sockets:
            conn.close()


def new_connections(contender: Contender, stats: NodeStats) -> list[int]:
    """Connections each node accepted during ``CONNECTION_REQUESTS`` warm requests."""
    before = stats.total_connections()
    contender.run(CONNECTION_REQUESTS)
    after = stats.total_connections()
    return [b - a for a, b in zip(before, after, strict=True)]


# The request cycle


def measure_requests(
    made: list[Contender], rounds: int, stats: Mapping[bool, NodeStats]
) -> dict[str, Any]:
    """Seconds per request of every contender in interleaved rounds, then the connections
    each opens over 400 more."""
    for contender in made:
        store_keys(contender)
        contender.run(WARM_UP_REQUESTS)
    seconds: dict[str, list[float]] = {c.name: [] for c in made}
    for round_index in range(rounds):
        for contender in workloads.rotated(made, round_index):
            elapsed = contender.run(REQUESTS_PER_MEASUREMENT)
            seconds[contender.name].append(elapsed / REQUESTS_PER_MEASUREMENT)
    connections = {c.name: new_connections(c, stats[c.tls]) for c in made}
    return {"seconds": seconds, "connections": connections}


# aget against get


def sequential(
    cache: Any, keys: list[str], loop: asyncio.AbstractEventLoop
) -> tuple[float, float]:
    """
    Seconds per ``get`` and per ``aget``, each awaited before the next, inside one
    request's thread-sensitive context. Blocks of each alternate, so that a stall of the
    shared machine falls on both sides of the ratio. Both cycle over ``keys``, which meet
    every node: over loopback one node may answer a blocking ``get`` in 25 µs and another
    in 70 µs, and one key would time only the node it happens to be placed on.
    """
    sync = awaited = 0.0
    block = workloads.cycle(keys, SEQUENTIAL_BLOCK)

    async def aget_block() -> float:
        start = time.perf_counter()
        for key in block:
            await cache.aget(key)
        return time.perf_counter() - start

    async def alternate() -> None:
        nonlocal sync, awaited
        async with ThreadSensitiveContext():
            for _ in range(SEQUENTIAL_BLOCKS):
                start = time.perf_counter()
                for key in block:
                    cache.get(key)
                sync += time.perf_counter() - start
                awaited += await aget_block()

    loop.run_until_complete(alternate())
    calls = SEQUENTIAL_BLOCKS * SEQUENTIAL_BLOCK
    return sync / calls, awaited / calls


def measure_aget(cluster: LocalCluster, rounds: int) -> dict[str, Any]:
    """
    Per backend and round, seconds per get and per aget, rounds interleaved, after a round
    that opens the connections and is not counted: every backend on asyncio's own loop, and
    ours also on uvloop's where it is installed.
    """
    keys = [f"bench:aget:{index}" for index in range(AGET_KEYS)]
    built = {}
    for backend in BACKENDS:
        alias = f"aget_{backend.name}"
        with override_settings(CACHES={alias: backend.settings(cluster)}):
            built[backend.name] = caches.create_connection(alias)
        built[backend.name].set_many(dict.fromkeys(keys, VALUE))
    loops = [asyncio.new_event_loop()]
    contenders = {name: (cache, loops[0]) for name, cache in built.items()}
    on_uvloop = new_uvloop()
    if on_uvloop is not None:
        loops.append(on_uvloop)
        contenders.update(
            {b.name + ON_UVLOOP: (built[b.name], on_uvloop) for b in BACKENDS if b.ours}
        )
    samples = {name: {"get": [], "aget": []} for name in contenders}
    try:
        for cache, loop in contenders.values():
            sequential(cache, keys, loop)
        for round_index in range(rounds):
            for name in workloads.rotated(list(contenders), round_index):
                cache, loop = contenders[name]
                sync, awaited = sequential(cache, keys, loop)
                samples[name]["get"].append(sync)
                samples[name]["aget"].append(awaited)
    finally:
        for loop in loops:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    return samples


def new_uvloop() -> asyncio.AbstractEventLoop | None:
    """
    A uvloop loop, where uvloop is installed (the ``bench`` extra installs it): uvicorn runs
    on it when it is, and the loop's own work is most of what ``aget`` adds to ``get``.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop()


# 50 requests at once


async def concurrent_wave(alias: str, wave: int) -> tuple[int, int, Counter[str]]:
    """50 ASGI-style requests at once, each writing and reading back its own value."""

    async def one(index: int) -> bool:
        async with ThreadSensitiveContext():
            cache = caches[alias]
            key, value = f"bench:concurrent:{alias}:{wave}:{index}", f"{wave}:{index}"
            await cache.aset(key, value)
            return await cache.aget(key) == value

    outcomes = await asyncio.gather(
        *(one(i) for i in range(CONCURRENT_REQUESTS)), return_exceptions=True
    )
    errors = Counter(type(o).__name__ for o in outcomes if isinstance(o, BaseException))
    wrong = sum(1 for o in outcomes if o is False)
    return len(outcomes), wrong, errors


def measure_concurrency(entries: Mapping[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Seconds per request of waves of 50, wrong values and exceptions, per backend, given
    each backend's ``CACHES`` entry by name."""
    aliases = {name: f"concurrent_{name}" for name in entries}
    settings = {aliases[name]: entry for name, entry in entries.items()}
    seconds: dict[str, list[float]] = {name: [] for name in aliases}
    wrong: Counter[str] = Counter()
    errors: dict[str, Counter[str]] = {name: Counter() for name in aliases}
    with override_settings(CACHES=settings):
        for round_index in range(rounds + 1):
            for name in workloads.rotated(list(aliases), round_index):
                gc.collect()
                start = time.perf_counter()
                done, bad, failed = asyncio.run(concurrent_wave(aliases[name], round_index))
                elapsed = time.perf_counter() - start
                if round_index:  # the first wave warms up
                    seconds[name].append(elapsed / done)
                wrong[name] += bad
                errors[name].update(failed)
    return {
        "seconds": seconds,
        "wrong": dict(wrong),
        "exceptions": {name: dict(counts) for name, counts in errors.items()},
    }


# The crash cases, each in a subprocess


def shared_by_threads(alias: str) -> Counter[str]:
    """One instance, made once, used by 32 threads at once."""
    cache = caches.create_connection(alias)
    outcome: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(SHARING_THREADS)

    def work(thread: int) -> None:
        start.wait()
        for i in range(SHARING_ITERATIONS):
            key, value = f"bench:shared:{thread}:{i % 10}", f"{thread}:{i}"
            with lock:
                outcome["operations"] += 3
            try:
                cache.set(key, value)
                right = cache.get(key) == value
                many = cache.get_many([key, f"bench:shared:{thread}:missing"])
                right = right and many == {key: value}
            except Exception as error:
                with lock:
                    outcome[f"exception {type(error).__name__}"] += 1
                continue
            with lock:
                outcome["wrong"] += not right

    threads = [threading.Thread(target=work, args=(t,)) for t in range(SHARING_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome


def made_at_startup(alias: str) -> Counter[str]:
    """An instance made before the server starts (in ``AppConfig.ready()``, say): every
    ASGI request's context inherits it."""
    caches[alias].get("bench:startup")
    outcome: Counter[str] = Counter()
    for wave in range(STARTUP_WAVES):
        done, wrong, errors = asyncio.run(concurrent_wave(alias, wave))
        outcome["operations"] += 2 * done
        outcome["wrong"] += wrong
        outcome.update({f"exception {name}": count for name, count in errors.items()})
    return outcome


CRASH_CASES: dict[str, Callable[[str], Counter[str]]] = {
    "one instance, 32 threads": shared_by_threads,
    "start-up instance, 50 ASGI requests": made_at_startup,
}


def child(spec: Mapping[str, Any]) -> None:
    """Run one crash case in this process and print what it saw, counting an error from
    closing the caches afterwards (as Django does at the end of a request) with the rest:
    a client corrupted by sharing can fail there too."""
    outcome: Counter[str] = Counter()
    try:
        with override_settings(CACHES={"crash": spec["settings"]}):
            outcome.update(CRASH_CASES[spec["case"]]("crash"))
    except Exception as error:
        outcome[f"exception {type(error).__name__}"] += 1
    print(json.dumps(dict(outcome)), flush=True)


def run_crash_case(case: str, backend: Backend, cluster: LocalCluster) -> dict[str, Any]:
    spec = {"case": case, "settings": backend.settings(cluster)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return {"ended": "hung", "outcome": {}, "stderr": ""}
    code = completed.returncode
    # An abort's cause is the first line it wrote (libmemcached's assertion); a Python
    # error's is the last line of its traceback.
    said = [line for line in completed.stderr.splitlines() if line.strip()][
        :: 1 if code < 0 else -1
    ]
    return {
        "ended": "ok" if code == 0 else signal.Signals(-code).name if code < 0 else f"exit {code}",
        "outcome": json.loads(completed.stdout.splitlines()[-1]) if code == 0 else {},
        "stderr": said[0][:200] if code != 0 and said else "",
    }


def measure_crashes(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    return {
        case: {backend.name: run_crash_case(case, backend, cluster) for backend in BACKENDS}
        for case in CRASH_CASES
    }


# Everything


def run(rounds: int = ROUNDS, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every measurement of this module, on a clear-text and a TLS cluster."""
    with (
        LocalCluster(nodes=NODES, relay=False) as clear,
        LocalCluster(nodes=NODES, tls=True, relay=False) as tls,
    ):
        clusters = {False: clear, True: tls}
        settings, made = contenders(clusters)
        stats = {is_tls: NodeStats(cluster) for is_tls, cluster in clusters.items()}
        try:
            with override_settings(CACHES=settings):
                progress(f"requests: {len(made)} contenders, {rounds} rounds")
                cycle = measure_requests(made, rounds, stats)
        finally:
            for contender in made:
                if contender.pool is not None:
                    contender.pool.shutdown()
            for node_stats in stats.values():
                node_stats.close()
        progress("requests: aget against get")
        aget = measure_aget(clear, rounds * AGET_ROUNDS_PER_ROUND)
        progress("requests: 50 concurrent ASGI requests")
        concurrency = measure_concurrency({b.name: b.settings(clear) for b in BACKENDS}, rounds)
        progress("requests: crash cases, in subprocesses")
        crashes = measure_crashes(clear)
    data: dict[str, Any] = {
        "nodes": NODES,
        "rounds": rounds,
        "aget_rounds": rounds * AGET_ROUNDS_PER_ROUND,
        "request_gets": REQUEST_GETS,
        "threads": WSGI_THREADS,
        "requests_per_measurement": REQUESTS_PER_MEASUREMENT,
        "connection_requests": CONNECTION_REQUESTS,
        "contenders": {c.name: describe(c) for c in made},
        "cycle": cycle,
        "aget": aget,
        "concurrency": concurrency,
        "crashes": crashes,
    }
    data["summary"] = summarize(data)
    data["targets"] = targets.request_targets(data["summary"])
    return data


def describe(contender: Contender) -> dict[str, Any]:
    return {
        "backend": contender.backend.name,
        "style": contender.style,
        "close": contender.close,
        "tls": contender.tls,
    }


def kinds(outcome: Mapping[str, int]) -> dict[str, int]:
    """The exceptions of a crash case's outcome, by class name."""
    return {
        what.removeprefix("exception "): count
        for what, count in outcome.items()
        if what.startswith("exception ")
    }


def summarize(data: Mapping[str, Any]) -> dict[str, Any]:
    """The figures the report shows, from the samples."""
    cycle = data["cycle"]
    contenders_ = data["contenders"]
    requests = {}
    for name, described in contenders_.items():
        if not described["close"]:
            continue
        twin = name.replace(", close,", ", no close,")
        ratios = paired(cycle["seconds"], twin, name)
        requests[name.replace(", close", "")] = {
            **described,
            "close_us": statistics.median(cycle["seconds"][name]) * 1e6,
            "no_close_us": statistics.median(cycle["seconds"][twin]) * 1e6,
            "close_cost": statistics.median(ratios),
            "quartiles": quartiles(ratios),
            "connections_per_node": max(cycle["connections"][name]),
            "connections_per_node_no_close": max(cycle["connections"][twin]),
        }
    aget = {
        name: {
            "get_us": statistics.median(times["get"]) * 1e6,
            "aget_us": statistics.median(times["aget"]) * 1e6,
            "ratios": paired({"a": times["get"], "b": times["aget"]}, "a", "b"),
        }
        for name, times in data["aget"].items()
    }
    for figures in aget.values():
        figures["ratio"] = statistics.median(figures["ratios"])
    concurrency = data["concurrency"]
    seconds = concurrency["seconds"]
    concurrent = {
        name: {
            "requests_per_second": 1 / statistics.median(values),
            "versus_stock": statistics.median(paired(seconds, name, STOCK)),
            "quartiles": quartiles(paired(seconds, name, STOCK)),
            "wrong": concurrency["wrong"].get(name, 0),
            "exceptions": sum(concurrency["exceptions"][name].values()),
        }
        for name, values in seconds.items()
    }
    crashes = {
        case: {
            name: {
                "crashed": result["ended"] != "ok",
                "how": result["ended"],
                "exceptions": sum(kinds(result["outcome"]).values()),
                "kinds": kinds(result["outcome"]),
                "wrong": result["outcome"].get("wrong", 0),
                "operations": result["outcome"].get("operations", 0),
                "stderr": result["stderr"],
            }
            for name, result in by_backend.items()
        }
        for case, by_backend in data["crashes"].items()
    }
    return {"requests": requests, "aget": aget, "concurrent": concurrent, "crashes": crashes}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds ({ROUNDS})")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    logging.getLogger("django_elasticache").setLevel(logging.ERROR)
    started = time.monotonic()
    data = run(
        args.rounds,
        lambda what: print(
            f"[{time.monotonic() - started:6.1f} s] {what}", file=sys.stderr, flush=True
        ),
    )
    report = [*request_report.sections(data), Section("Targets", [target_table(data["targets"])])]
    print(tables.text(report))
    print(f"\n{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
