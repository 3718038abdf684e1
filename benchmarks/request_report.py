"""
The report's sections on Django's request cycle and concurrency (``request_cycle.py``): its
tables and what they say, for the terminal and RESULTS.rst alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from tables import Notes, Section, Table, fmt_ratio, fmt_us

REQUEST_LABELS = {
    "ours": "ours (pylibmc)",
    "ours_pymemcache": "ours (pymemcache)",
    "stock": "PyLibMCCache",
    "pymemcache": "PyMemcacheCache",
    "ours_uvloop": "ours (pylibmc), uvloop",
    "ours_pymemcache_uvloop": "ours (pymemcache), uvloop",
}


def sections(data: Mapping[str, Any]) -> list[Section]:
    """What ``request_cycle.py`` measured: the request cycle, aget, concurrency, crashes."""
    figures = data["summary"]
    nodes = data["nodes"]
    return [
        Section(
            "Django request cycle",
            [
                Table.of(
                    [
                        "backend",
                        "style",
                        "transport",
                        "µs with close",
                        "µs without",
                        "close cost",
                        "new connections, close",
                        "without",
                    ],
                    request_rows(figures),
                    f"On {nodes}-node clusters, a request is {data['request_gets']} ``get`` "
                    "through ``caches[alias]`` and then Django's ``close_caches()`` (what "
                    "``request_finished`` runs), or the same without closing. *wsgi*: a pool "
                    f"of {data['threads']} threads, each with its own backend instance; *asgi*: "
                    "each request a task in its own ``ThreadSensitiveContext``, its view and the "
                    f"signal run through ``sync_to_async``, {data['threads']} at a time, as "
                    "Django's ASGI handler runs a sync view. Median µs per request over "
                    f"{data['rounds']} interleaved rounds "
                    f"of {data['requests_per_measurement']}; *close cost* is the median of the "
                    "per-round ratios. *new connections* is the most any node accepted (its "
                    f"``total_connections``) over {data['connection_requests']} warm requests.",
                ),
            ],
        ),
        Section(
            "aget and 50 concurrent ASGI requests",
            [
                Table.of(
                    ["backend", "get µs", "aget µs", "aget / get"],
                    aget_rows(figures),
                    "``aget`` awaited one after another inside one request's context, against "
                    f"``get`` on the same instance (median of the ratios of "
                    f"{data['aget_rounds']} rounds), on asyncio's own event loop; the *uvloop* "
                    "rows run ours on uvloop's, as uvicorn does where uvloop is installed.",
                ),
                Table.of(
                    [
                        "backend",
                        "requests/s",
                        "vs PyLibMCCache",
                        "wrong values",
                        "exceptions",
                    ],
                    concurrent_rows(figures),
                    "Waves of 50 ASGI-style requests at once (``asyncio.gather``), each in its "
                    "own context writing its own key with ``aset`` and reading it back with "
                    "``aget``.",
                ),
            ],
        ),
        Section(
            "Crash cases",
            [
                Table.of(
                    [
                        "case",
                        "backend",
                        "crashed",
                        "exceptions",
                        "wrong values",
                        "operations tried",
                    ],
                    crash_rows(figures),
                    "Each in a fresh subprocess: one backend instance shared by 32 threads "
                    "doing set/get/get_many; an instance made at start-up, then used by waves of "
                    "50 ASGI-style requests (each in its own ``ThreadSensitiveContext``) with "
                    "``aset``/``aget``.",
                ),
                Notes(crash_notes(figures)),
            ],
        ),
    ]


def request_rows(figures: Mapping[str, Any]) -> Iterator[list[str]]:
    for row in figures["requests"].values():
        yield [
            REQUEST_LABELS[row["backend"]],
            row["style"],
            "TLS" if row["tls"] else "clear",
            f"{row['close_us']:,.0f}",
            f"{row['no_close_us']:,.0f}",
            fmt_ratio(row["close_cost"]),
            str(row["connections_per_node"]),
            str(row["connections_per_node_no_close"]),
        ]


def aget_rows(figures: Mapping[str, Any]) -> Iterator[list[str]]:
    for name, row in figures["aget"].items():
        yield [
            REQUEST_LABELS[name],
            fmt_us(row["get_us"]),
            fmt_us(row["aget_us"]),
            fmt_ratio(row["ratio"]),
        ]


def concurrent_rows(figures: Mapping[str, Any]) -> Iterator[list[str]]:
    for name, row in figures["concurrent"].items():
        yield [
            REQUEST_LABELS[name],
            f"{row['requests_per_second']:,.0f}",
            fmt_ratio(row["versus_stock"]),
            str(row["wrong"]),
            str(row["exceptions"]),
        ]


def crash_rows(figures: Mapping[str, Any]) -> Iterator[list[str]]:
    for case, by_backend in figures["crashes"].items():
        for name, row in by_backend.items():
            yield [
                case,
                REQUEST_LABELS[name],
                f"yes ({row['how']})" if row["crashed"] else "no",
                str(row["exceptions"]),
                str(row["wrong"]),
                str(row["operations"]),
            ]


def crash_notes(figures: Mapping[str, Any]) -> list[str]:
    """The exceptions raised, and what a crashed process said, once per distinct message."""
    raised = [
        f"{REQUEST_LABELS[name]}, {case}: "
        + ", ".join(f"{kind} {count}" for kind, count in row["kinds"].items())
        for case, by_backend in figures["crashes"].items()
        for name, row in by_backend.items()
        if row["kinds"]
    ]
    said = {
        row["stderr"]
        for by_backend in figures["crashes"].values()
        for row in by_backend.values()
        if row["crashed"] and row["stderr"]
    }
    notes = [f"Raised: {'; '.join(raised)}."] if raised else []
    return [*notes, *(f"A crashed process wrote: {message}" for message in sorted(said))]
