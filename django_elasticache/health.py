"""
The health of each cluster a project caches on, as an operator wants to see it.

``check(alias)`` asks the alias's configuration endpoint for its nodes, then every node at
once (one thread each) for ``version`` and ``stats``, each within the timeout, and returns a
``ClusterHealth``: what the cluster says, what each node says, and what this process has
been using (its node list, when the endpoint last answered it, its last refresh error).
The management command ``elasticache``, ``python -m django_elasticache status``, the system
checks tagged ``elasticache_network`` and the django-health-check plugin all render or
judge this one object, so they cannot disagree.

Nothing here changes the process's node list or its clients: the health of a cluster is
asked on connections of its own, closed before returning.
"""

from __future__ import annotations

import datetime
import enum
import json
import ssl
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

from django.core.cache.backends.base import InvalidCacheBackendError

from .cluster_utils import (
    ClusterDiscoveryError,
    ClusterNode,
    DiscoveryNotSupported,
    WrongProtocolData,
    _connect,
    _Connection,
    discover,
    format_address,
)
from .options import BackendOptions, Endpoint, parse_location, split_options
from .topology import ClusterTopology, topology_for

__all__ = [
    "BACKENDS",
    "ClusterHealth",
    "NodeHealth",
    "NodeStats",
    "ProcessView",
    "Status",
    "check",
    "check_all",
    "check_endpoint",
    "format_report",
    "our_cache_aliases",
]

BACKENDS = (
    "django_elasticache.memcached.ElastiCache",
    "django_elasticache.pymemcache.ElastiCache",
)
"""The BACKEND values of this package's cache backends."""


class Status(enum.IntEnum):
    """A cluster's state, worst last; the value is the ``elasticache`` command's exit status."""

    HEALTHY = 0
    DEGRADED = 1
    UNREACHABLE = 2


@dataclass(frozen=True)
class NodeStats:
    """
    What a node's ``stats`` reply says about its load. A field the server does not report
    (ElastiCache Serverless reports fewer) is None.
    """

    uptime_seconds: int | None
    items: int | None
    bytes_used: int | None
    bytes_limit: int | None
    get_hits: int | None
    get_misses: int | None
    evictions: int | None
    current_connections: int | None

    @classmethod
    def from_reply(cls, stats: Mapping[str, str]) -> NodeStats:
        def number(name: str) -> int | None:
            value = stats.get(name, "")
            return int(value) if value.isdigit() else None

        return cls(
            uptime_seconds=number("uptime"),
            items=number("curr_items"),
            bytes_used=number("bytes"),
            bytes_limit=number("limit_maxbytes"),
            get_hits=number("get_hits"),
            get_misses=number("get_misses"),
            evictions=number("evictions"),
            current_connections=number("curr_connections"),
        )

    @property
    def hit_ratio(self) -> float | None:
        """Hits over all gets since the node started; None before its first get."""
        if self.get_hits is None or self.get_misses is None:
            return None
        gets = self.get_hits + self.get_misses
        return self.get_hits / gets if gets else None


@dataclass(frozen=True)
class NodeHealth:
    """One node as the cluster lists it, and what it answered (or why it did not)."""

    hostname: str
    ip: str
    port: int
    engine_version: str | None
    stats: NodeStats | None
    error: str | None

    @property
    def up(self) -> bool:
        return self.error is None

    @property
    def address(self) -> str:
        return format_address(self.ip or self.hostname, self.port)


@dataclass(frozen=True)
class ProcessView:
    """
    What this process holds for the endpoint: the node list its backends use (None before
    its first discovery), when the endpoint last gave it one, and its last discovery error.
    """

    config_version: int | None
    nodes: tuple[str, ...]
    last_answer: datetime.datetime | None
    last_error: str | None
    last_error_time: datetime.datetime | None

    @classmethod
    def of(cls, topology: ClusterTopology) -> ProcessView:
        config = topology.config
        error = topology.last_error
        return cls(
            config_version=None if config is None else config.version,
            nodes=() if config is None else config.addresses,
            last_answer=_wall_clock(topology.last_answer_time),
            last_error=None if error is None else str(error),
            last_error_time=_wall_clock(topology.last_error_time),
        )


@dataclass(frozen=True)
class ClusterHealth:
    """
    One configuration endpoint: the nodes it lists and how each is doing.

    ``discovery_error`` says why the endpoint gave no node list. With IGNORE_CLUSTER_ERRORS
    the backend then uses the endpoint itself as its only node, and so does this report.
    """

    alias: str | None
    backend: str | None
    endpoint: str
    config_version: int | None
    nodes: tuple[NodeHealth, ...]
    discovery_error: str | None
    process: ProcessView | None
    fallback_expected: bool = False

    @property
    def status(self) -> Status:
        up = sum(node.up for node in self.nodes)
        if not up:
            return Status.UNREACHABLE
        if up < len(self.nodes):
            return Status.DEGRADED
        if self.discovery_error is not None and not self.fallback_expected:
            return Status.DEGRADED
        return Status.HEALTHY

    @property
    def problems(self) -> list[str]:
        """One sentence per thing wrong, empty when the cluster is healthy."""
        found = []
        if self.discovery_error is not None and not (self.nodes and self.fallback_expected):
            found.append(self.discovery_error)
        found += [
            f"node {node.address} ({node.hostname}): {node.error}"
            for node in self.nodes
            if node.error
        ]
        return found

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: dates in ISO 8601, the status by name."""
        data = asdict(self)
        data["status"] = self.status.name.lower()
        for node, node_data in zip(self.nodes, data["nodes"], strict=True):
            node_data["address"] = node.address
            node_data["up"] = node.up
            if node.stats is not None:
                node_data["stats"]["hit_ratio"] = node.stats.hit_ratio
        return json.loads(json.dumps(data, default=_json_value))


def our_cache_aliases() -> list[str]:
    """The aliases in ``settings.CACHES`` that use one of this package's backends."""
    from django.conf import settings

    return [alias for alias, cache in settings.CACHES.items() if cache.get("BACKEND") in BACKENDS]


def check(alias: str = "default", timeout: float | None = None) -> ClusterHealth:
    """
    The health of the cluster behind cache ``alias``. ``timeout`` bounds discovery and
    each node's answer (default: the alias's DISCOVERY_TIMEOUT); the nodes are asked in
    parallel, so this takes about two timeouts at worst.

    Raises ``InvalidCacheBackendError`` if the alias does not exist, does not use this
    package's backends, or its LOCATION or OPTIONS are invalid.
    """
    from django.conf import settings

    cache = settings.CACHES.get(alias)
    if cache is None or cache.get("BACKEND") not in BACKENDS:
        raise InvalidCacheBackendError(
            f"Cache {alias!r} does not use a django_elasticache backend; those that do: "
            f"{', '.join(our_cache_aliases()) or 'none'}"
        )
    endpoint = parse_location(cache.get("LOCATION"))
    options, _ = split_options(cache.get("OPTIONS"))
    return replace(
        check_endpoint(endpoint, options, timeout),
        alias=alias,
        backend=cache["BACKEND"],
        process=ProcessView.of(topology_for(endpoint, options.discovery_settings)),
    )


def check_all(timeout: float | None = None) -> list[ClusterHealth]:
    """``check`` for every alias that uses this package's backends, in settings order."""
    return [check(alias, timeout) for alias in our_cache_aliases()]


def check_endpoint(
    endpoint: Endpoint, options: BackendOptions, timeout: float | None = None
) -> ClusterHealth:
    """The health of the cluster at ``endpoint``, asked as a backend with ``options`` would."""
    timeout = options.discovery_timeout if timeout is None else timeout
    name = format_address(endpoint.host, endpoint.port)
    try:
        config = discover(endpoint.host, endpoint.port, timeout, options.tls)
    except ClusterDiscoveryError as exc:
        # What the backend does too: the endpoint as the only node, or no node at all.
        fallback = (ClusterNode(hostname=endpoint.host, ip="", port=endpoint.port),)
        return ClusterHealth(
            alias=None,
            backend=None,
            endpoint=name,
            config_version=None,
            nodes=_ask_nodes(
                fallback if options.ignore_cluster_errors else (), timeout, options.tls
            ),
            discovery_error=str(exc),
            process=None,
            fallback_expected=isinstance(exc, DiscoveryNotSupported),
        )
    return ClusterHealth(
        alias=None,
        backend=None,
        endpoint=name,
        config_version=config.version,
        nodes=_ask_nodes(config.nodes, timeout, options.tls),
        discovery_error=None,
        process=None,
    )


def _ask_nodes(
    nodes: Iterable[ClusterNode], timeout: float, tls: ssl.SSLContext | None
) -> tuple[NodeHealth, ...]:
    nodes = tuple(nodes)
    if not nodes:
        return ()
    with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="node health") as pool:
        return tuple(pool.map(lambda node: _ask_node(node, timeout, tls), nodes))


def _ask_node(node: ClusterNode, timeout: float, tls: ssl.SSLContext | None) -> NodeHealth:
    """
    ``version`` and ``stats`` from one node, on a connection of our own, to its listed IP;
    with TLS its certificate is verified against its hostname, as the backends do.
    """
    deadline = time.monotonic() + timeout
    host, server_hostname = node.ip or node.hostname, node.hostname or node.ip
    version, stats, error = None, None, None
    try:
        with _connect(node.address, host, node.port, deadline, tls, server_hostname) as conn:
            conn.send(b"version\r\nstats\r\n")
            version = _version(node.address, conn.read_line())
            stats = NodeStats.from_reply(_stats(node.address, conn))
    except ClusterDiscoveryError as exc:
        error = exc.problem
    return NodeHealth(node.hostname, node.ip, node.port, version, stats, error)


NODE_COLUMNS = (
    "hostname",
    "address",
    "engine",
    "state",
    "uptime",
    "items",
    "memory used",
    "hit ratio",
    "evictions",
    "connections",
)


def format_report(health: ClusterHealth) -> str:
    """``health`` as the lines an operator reads: the cluster, a table of nodes, the process."""
    name = health.endpoint if health.alias is None else f"cache {health.alias!r}"
    backend = f" ({health.backend})" if health.backend else ""
    up = sum(node.up for node in health.nodes)
    version = (
        "no config" if health.config_version is None else f"config version {health.config_version}"
    )
    lines = [
        f"{name}{backend}: {health.status.name}",
        f"  endpoint {health.endpoint}, {version}, {up} of {len(health.nodes)} nodes up",
    ]
    if health.discovery_error is not None:
        lines.append(f"  discovery: {health.discovery_error}")
    if health.nodes:
        rows = [NODE_COLUMNS, *(_node_row(node) for node in health.nodes)]
        widths = [max(len(row[column]) for row in rows) for column in range(len(NODE_COLUMNS))]
        for row in rows:
            lines.append(
                "  "
                + "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
        lines += [f"  {node.address} is down: {node.error}" for node in health.nodes if node.error]
    if health.process is not None:
        lines.append(_process_line(health.process))
    return "\n".join(lines)


def _node_row(node: NodeHealth) -> tuple[str, ...]:
    stats = node.stats
    if stats is None:
        return (node.hostname, node.address, node.engine_version or "-", "DOWN", *["-"] * 6)
    return (
        node.hostname,
        node.address,
        node.engine_version or "-",
        "up",
        _duration(stats.uptime_seconds),
        _count(stats.items),
        f"{_size(stats.bytes_used)} of {_size(stats.bytes_limit)}",
        "-" if stats.hit_ratio is None else f"{stats.hit_ratio:.1%}",
        _count(stats.evictions),
        _count(stats.current_connections),
    )


def _process_line(process: ProcessView) -> str:
    if process.config_version is None:
        held = "this process has not discovered this cluster yet"
    else:
        held = (
            f"this process uses config version {process.config_version}: "
            f"{', '.join(process.nodes)}; "
            f"the endpoint last answered at {_time(process.last_answer)}"
        )
    if process.last_error is None:
        return f"  {held}; no discovery error"
    return (
        f"  {held}; last discovery error at {_time(process.last_error_time)}: {process.last_error}"
    )


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def _time(moment: datetime.datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _version(address: str, line: bytes) -> str:
    if not line.startswith(b"VERSION "):
        raise WrongProtocolData(address, "not a memcached VERSION reply", line)
    return line[len(b"VERSION ") :].decode("ascii", "replace")


def _stats(address: str, conn: _Connection) -> dict[str, str]:
    """The ``STAT name value`` lines up to ``END``, as a dict of strings."""
    stats = {}
    while (line := conn.read_line()) != b"END":
        parts = line.decode("ascii", "replace").split(" ", 2)
        if len(parts) != 3 or parts[0] != "STAT":
            raise WrongProtocolData(address, "not a memcached stats reply", line)
        stats[parts[1]] = parts[2]
    return stats


def _wall_clock(timestamp: float | None) -> datetime.datetime | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


def _json_value(value: object) -> object:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
