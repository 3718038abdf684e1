"""
The process-wide node list of each configuration endpoint.

Django builds one backend instance per thread, and a process may run many threads, so the
node list lives here, once per process per endpoint and settings: the first request
discovers it (concurrent first requests wait for that one discovery), later requests read it
without locking, and a background thread asks the endpoint again every
``refresh_interval`` seconds. Backends compare the ``ClusterConfig`` they built their client
for with ``ClusterTopology.current()`` by identity: a new object means a new node list.

The rules for taking a refreshed list are those of AWS's own cluster clients: apply it only
when it differs and its config version is higher, and keep the last good list when a refresh
fails. A forked child keeps the node list as a new object (so every backend builds fresh
connections) and none of the parent's locks or refresh state.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time

from .cluster_utils import (
    ClusterConfig,
    ClusterDiscoveryError,
    ClusterNode,
    DiscoveryNotSupported,
    discover,
    format_address,
)
from .options import BackendOptions, Endpoint
from .signals import node_list_changed, refresh_failed, send

__all__ = ["ClusterTopology", "forget_all", "topology_for"]

logger = logging.getLogger("django_elasticache")

FIRST_DISCOVERY_RETRY = 1.0
"""Seconds during which a failed first discovery is re-raised instead of asked again."""

ERROR_REFRESH_SPACING = 5.0
"""Least seconds between two refreshes that node errors bring forward."""

REFRESH_JITTER = 0.1
"""Share of the interval added at random, so a fleet of workers does not poll in step."""


class ClusterTopology:
    """The current node list of one configuration endpoint, for the whole process."""

    def __init__(self, endpoint: Endpoint, options: BackendOptions) -> None:
        self.endpoint = endpoint
        self.options = options
        self._reset_machinery()
        self._config: ClusterConfig | None = None
        self._first_error: ClusterDiscoveryError | None = None
        self._first_error_until = 0.0
        self._last_error_refresh = -math.inf
        self.last_answer_time: float | None = None
        self.last_error: ClusterDiscoveryError | None = None
        self.last_error_time: float | None = None

    def _reset_machinery(self) -> None:
        self._lock = threading.Lock()
        self._refreshing = False
        self._next_refresh = math.inf

    @property
    def name(self) -> str:
        return format_address(self.endpoint.host, self.endpoint.port)

    @property
    def config(self) -> ClusterConfig | None:
        """The node list in use, or None before the first discovery; never asks."""
        return self._config

    def current(self) -> ClusterConfig:
        """
        The node list to use now. Only the first call of the process waits on the
        endpoint; afterwards a due refresh is started in the background and the current
        list returned at once.
        """
        config = self._config
        if config is None:
            return self._discover_first()
        if time.monotonic() >= self._next_refresh:
            self._start_refresh()
        return config

    def refresh_soon(self) -> None:
        """
        Bring the next refresh forward because a node failed: the cluster may have
        replaced it. Spaced so that a dead node cannot turn into a discovery storm.
        """
        now = time.monotonic()
        if self._config is None or self.options.refresh_interval is None:
            return
        if now - self._last_error_refresh < ERROR_REFRESH_SPACING:
            return
        self._last_error_refresh = now
        self._next_refresh = now
        self._start_refresh()

    def _discover_first(self) -> ClusterConfig:
        with self._lock:
            if self._config is not None:
                return self._config
            if self._first_error is not None and time.monotonic() < self._first_error_until:
                raise self._first_error.with_traceback(None)
            try:
                config = self._ask()
            except ClusterDiscoveryError as exc:
                if not self.options.ignore_cluster_errors:
                    self._first_error = exc
                    self._first_error_until = time.monotonic() + FIRST_DISCOVERY_RETRY
                    raise
                config = self._fallback(exc)
            else:
                self._schedule_next_refresh()
                logger.info(
                    "Discovered %s: config version %d, nodes %s",
                    self.name,
                    config.version,
                    ", ".join(config.addresses),
                )
            self._config = config
            return config

    def _fallback(self, error: ClusterDiscoveryError) -> ClusterConfig:
        """LOCATION itself as the only node, as IGNORE_CLUSTER_ERRORS asks."""
        logger.warning("%s; using %s as the only node (IGNORE_CLUSTER_ERRORS)", error, self.name)
        if not isinstance(error, DiscoveryNotSupported):
            self._schedule_next_refresh()
        node = ClusterNode(hostname=self.endpoint.host, ip="", port=self.endpoint.port)
        return ClusterConfig(version=0, nodes=(node,))

    def _ask(self) -> ClusterConfig:
        """Discover once, remembering when the endpoint last answered or failed (wall clock)."""
        try:
            config = discover(
                self.endpoint.host,
                self.endpoint.port,
                self.options.discovery_timeout,
                self.options.tls,
            )
        except ClusterDiscoveryError as exc:
            self.last_error, self.last_error_time = exc, time.time()
            raise
        self.last_answer_time = time.time()
        return config

    def _schedule_next_refresh(self) -> None:
        interval = self.options.refresh_interval
        if interval is None:
            self._next_refresh = math.inf
        else:
            jitter = random.uniform(0, REFRESH_JITTER * interval)
            self._next_refresh = time.monotonic() + interval + jitter

    def _start_refresh(self) -> None:
        with self._lock:
            if self._refreshing or time.monotonic() < self._next_refresh:
                return
            self._refreshing = True
            self._schedule_next_refresh()
        thread = threading.Thread(target=self._refresh, name=f"refresh {self.name}", daemon=True)
        thread.start()

    def _refresh(self) -> None:
        """One refresh, in its own thread; whatever happens, the last good list stays."""
        try:
            config = self._ask()
        except ClusterDiscoveryError as exc:
            logger.warning("%s; keeping config version %d", exc, self._config.version)
            send(refresh_failed, ClusterTopology, endpoint=self.name, error=exc)
        except Exception as exc:
            logger.exception("Refreshing %s failed; keeping the node list", self.name)
            send(refresh_failed, ClusterTopology, endpoint=self.name, error=exc)
        else:
            self._apply(config)
        finally:
            self._refreshing = False

    def _apply(self, new: ClusterConfig) -> None:
        old = self._config
        if new.nodes == old.nodes:
            return
        if new.version <= old.version:
            logger.warning(
                "Ignoring stale node list from %s: config version %d is not above %d",
                self.name,
                new.version,
                old.version,
            )
            return
        self._config = new
        logger.info(
            "Node list of %s changed: version %d [%s] -> version %d [%s]",
            self.name,
            old.version,
            ", ".join(old.addresses),
            new.version,
            ", ".join(new.addresses),
        )
        send(node_list_changed, ClusterTopology, endpoint=self.name, old=old, new=new)

    def _after_fork_in_child(self) -> None:
        """
        Start the child clean: fresh locks, no inherited refresh in flight, and the node
        list as a new object so that backends build their own connections.
        """
        self._reset_machinery()
        if self._config is not None:
            self._config = ClusterConfig(self._config.version, self._config.nodes)
            self._schedule_next_refresh()


_topologies: dict[tuple[Endpoint, BackendOptions], ClusterTopology] = {}
_topologies_lock = threading.Lock()


def topology_for(endpoint: Endpoint, options: BackendOptions) -> ClusterTopology:
    """The process's one topology for this endpoint and these options."""
    key = (endpoint, options)
    with _topologies_lock:
        if key not in _topologies:
            _topologies[key] = ClusterTopology(endpoint, options)
        return _topologies[key]


def forget_all() -> None:
    """
    Drop every topology, so the next request discovers afresh. For tests: a cluster started
    after another one stopped may get the same endpoint port, and must not inherit its
    node list. Backends built before keep the topology they hold.
    """
    with _topologies_lock:
        _topologies.clear()


def _after_fork_in_child() -> None:
    global _topologies_lock
    _topologies_lock = threading.Lock()
    for topology in _topologies.values():
        topology._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
