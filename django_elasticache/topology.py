"""
The process-wide node list of each configuration endpoint.

Django builds one backend instance per thread, and a process may run many threads, so the
node list lives here, once per process per endpoint and settings: the first request
discovers it, later requests read it without locking, and a background thread asks the
endpoint again every ``refresh_interval`` seconds. Backends compare the ``ClusterConfig``
they built their client for with ``ClusterTopology.current()`` by identity: a new object
means a new node list.

The rules, in the order a process meets them:

First discovery. The request that finds no list asks the endpoint and waits for the answer,
at most DISCOVERY_TIMEOUT. A request arriving while that attempt is in flight waits for it
at most ``FIRST_DISCOVERY_GRACE`` seconds counted from the attempt's start (a healthy
endpoint answers well within it), then raises ``DiscoveryPending``. After a failed attempt,
requests raise that failure again at once, saying when it happened, until
``FIRST_DISCOVERY_RETRY`` seconds after the attempt ended; the next request then starts a
new attempt in a background thread and waits for it at most the grace. So a hung endpoint
holds one thread of a process for one timeout, once; every other request fails within the
grace, and under IGNORE_EXCEPTIONS the backends turn that into a miss.

Refresh. A request finding the list older than ``refresh_interval`` minus up to
``REFRESH_JITTER`` of it (drawn per process, so a fleet of workers does not poll in step)
starts a refresh in the background and goes on with the list it has. The age counts from
when the endpoint last confirmed the list, not from when this process got it. A node error
brings the refresh forward, at most once every ``ERROR_REFRESH_SPACING`` seconds.

Taking a reply. A list equal to the current one confirms it. A different list is applied
when its config version is higher. A different list with a lower or equal version is
stale and ignored, unless the endpoint has answered with nothing but stale lists for at
least ``STALE_REPLIES_TO_ACCEPT`` refreshes in a row spanning at least
``STALE_SECONDS_TO_ACCEPT`` seconds: then the latest of them is applied, since a cluster
deleted and re-created under the same name starts again at version 1 while every process
holds a higher one. One odd reply never moves the list back; a failed refresh neither
counts nor breaks the run. Node errors, which follow a re-creation because the old nodes
are gone, bring refreshes forward and so shorten the recovery to about
``STALE_SECONDS_TO_ACCEPT``. Versions above 2**63 - 1 are refused by the parser
(``cluster_utils.MAX_CONFIG_VERSION``). A failed refresh keeps the last good list.

Endpoint outage. When a refresh cannot reach the endpoint (unreachable or timed out, not a
protocol or TLS error), up to three known nodes are asked instead, all within one more
DISCOVERY_TIMEOUT, each with the same TLS context verifying the node's hostname; their
answer is taken by the rules above.

Serverless. An endpoint named ``<name>.serverless.<region>.cache.amazonaws.com`` is never
asked; one that answers ``ERROR`` over TLS is taken for a serverless cache too. Either way
the endpoint is the only node, the ``ClusterConfig`` says ``serverless=True``, and it is
never refreshed. Without TLS, ``ERROR`` means a plain memcached, which needs
IGNORE_CLUSTER_ERRORS.

Fork. A forked child keeps the node list as a new object (so every backend builds fresh
connections), none of the parent's locks or work in flight, and the time the list was last
confirmed: a pre-fork server's master that served no request for a while hands its
workers an old list, which they refresh at their first request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Callable

from . import forks
from .cluster_utils import (
    MAX_NODES_ASKED,
    ClusterConfig,
    ClusterDiscoveryError,
    ClusterNode,
    DiscoveryNotSupported,
    EndpointTimeout,
    EndpointUnreachable,
    discover,
    discover_from_nodes,
    format_address,
    is_serverless_host,
)
from .options import DiscoverySettings, Endpoint
from .signals import node_list_changed, refresh_failed, send

__all__ = ["ClusterTopology", "DiscoveryPending", "forget_all", "topology_for"]

logger = logging.getLogger("django_elasticache")

FIRST_DISCOVERY_GRACE = 0.1
"""
Seconds, from the start of a first discovery, that other requests may wait for it. A
loopback discovery takes about a millisecond and one across a VPC with a TLS handshake a few
tens; a hung endpoint costs each thread at most this much per attempt.
"""

FIRST_DISCOVERY_RETRY = 1.0
"""Seconds after a failed first discovery ended during which it is not attempted again."""

ERROR_REFRESH_SPACING = 5.0
"""Least seconds between two refreshes that node errors bring forward."""

REFRESH_JITTER = 0.1
"""Largest share of the interval taken off at random, so workers do not poll in step."""

STALE_REPLIES_TO_ACCEPT = 3
"""Stale replies in a row after which the latest is applied (with the span below)."""

STALE_SECONDS_TO_ACCEPT = 10.0
"""
Least seconds between the first and the last of those stale replies: longer than a config
change takes to reach every node, so a lagging node is never followed backwards.
"""

Clock = Callable[[], float]
Discover = Callable[..., ClusterConfig]
Runner = Callable[[Callable[[], None], str], None]


class DiscoveryPending(ClusterDiscoveryError):
    """The process's first discovery is under way, and this request did not wait for it."""


def _in_daemon_thread(work: Callable[[], None], name: str) -> None:
    threading.Thread(target=work, name=name, daemon=True).start()


class _FirstAttempt:
    """A first discovery in flight, which other requests may wait on for the grace."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.done = threading.Event()


class _StaleRun:
    """The stale replies received in a row, and whether they now outweigh the version rule."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.count = 0
        self.since = math.inf

    def note(self, now: float) -> bool:
        """Count one stale reply; tell whether the run is long enough to follow it."""
        self.count += 1
        self.since = min(self.since, now)
        return (
            self.count >= STALE_REPLIES_TO_ACCEPT and now - self.since >= STALE_SECONDS_TO_ACCEPT
        )


class ClusterTopology:
    """
    The current node list of one configuration endpoint, for the whole process.

    ``clock``, ``discover`` and ``run_in_background`` are the monotonic clock, the
    discovery of one server (``cluster_utils.discover``) and how background work is
    started (a daemon thread); tests of the rules replace them.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        options: DiscoverySettings,
        *,
        clock: Clock = time.monotonic,
        discover: Discover = discover,
        run_in_background: Runner = _in_daemon_thread,
    ) -> None:
        self.endpoint = endpoint
        self.options = options
        self._clock = clock
        self._discover = discover
        self._run_in_background = run_in_background
        self._reset_machinery()
        self._config: ClusterConfig | None = None
        self._confirmed_at = -math.inf
        self._failure: ClusterDiscoveryError | None = None
        self._failed_at = -math.inf
        self._last_error_refresh = -math.inf
        self.last_answer_time: float | None = None
        self.last_error: ClusterDiscoveryError | None = None
        self.last_error_time: float | None = None
        self._stale = _StaleRun()

    def _reset_machinery(self) -> None:
        self._lock = threading.Lock()
        self._attempt: _FirstAttempt | None = None
        # While a refresh runs, until when: a refresh whose start was interrupted (an
        # exception landing before its thread started) must not stop every later one.
        self._refreshing_until = 0.0
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
        if self._clock() >= self._next_refresh:
            self._start_refresh()
        return config

    def refresh_soon(self) -> None:
        """
        Bring the next refresh forward because a node failed: the cluster may have
        replaced it. Spaced so that a dead node cannot turn into a discovery storm.
        """
        now = self._clock()
        if self._next_refresh == math.inf:  # no list yet, serverless, or no refreshing
            return
        if now - self._last_error_refresh < ERROR_REFRESH_SPACING:
            return
        self._last_error_refresh = now
        self._next_refresh = now
        self._start_refresh()

    # First discovery

    def _discover_first(self) -> ClusterConfig:
        started_here = False
        try:
            with self._lock:
                if self._config is not None:
                    return self._config
                attempt = self._attempt
                if attempt is None:
                    self._raise_recent_failure()
                    attempt = self._attempt = _FirstAttempt(self._clock())
                    started_here = True
                very_first = started_here and self._failure is None
            if very_first:
                self._attempt_first(attempt)
            elif started_here:
                self._run_in_background(
                    lambda: self._attempt_first(attempt), f"discover {self.name}"
                )
        except BaseException:
            if started_here and attempt is not None:
                # Interrupted before the attempt ran or its thread started (a signal
                # handler's exception, as the lock was released): the next request starts
                # another, instead of every request waiting on one that never ends.
                with self._lock:
                    if self._attempt is attempt:
                        self._attempt = None
                attempt.done.set()
            raise
        if not very_first:
            attempt.done.wait(max(attempt.started + FIRST_DISCOVERY_GRACE - self._clock(), 0))
        return self._first_outcome(attempt)

    def _raise_recent_failure(self) -> None:
        """Within the retry window, fail at once with the last failure, saying so."""
        failure = self._failure
        now = self._clock()
        if failure is None or now >= self._failed_at + FIRST_DISCOVERY_RETRY:
            return
        problem = (
            f"{failure.problem} ({now - self._failed_at:.1f} s ago; "
            f"not asked again before {self._failed_at + FIRST_DISCOVERY_RETRY - now:.1f} s)"
        )
        raise type(failure)(failure.endpoint, problem, failure.received)

    def _attempt_first(self, attempt: _FirstAttempt) -> None:
        """One first discovery; its outcome is left for every request to read."""
        try:
            config = self._first_config()
        except ClusterDiscoveryError as exc:
            with self._lock:
                self._failure, self._failed_at = exc, self._clock()
        else:
            with self._lock:
                self._config, self._failure = config, None
        finally:
            with self._lock:
                self._attempt = None
            attempt.done.set()

    def _first_outcome(self, attempt: _FirstAttempt) -> ClusterConfig:
        config = self._config
        if config is not None:
            return config
        failure = self._failure
        if attempt.done.is_set() and failure is not None:
            raise failure
        waited = self._clock() - attempt.started
        raise DiscoveryPending(
            self.name,
            f"the first discovery of this process is still under way ({waited:.2f} s), "
            "and requests do not wait for it",
        )

    def _first_config(self) -> ClusterConfig:
        """The first node list: discovered, serverless, or LOCATION under IGNORE_CLUSTER_ERRORS."""
        if is_serverless_host(self.endpoint.host):
            return self._serverless("its name says so")
        try:
            config = self._ask_endpoint()
        except DiscoveryNotSupported as exc:
            if self.options.tls is not None:
                return self._serverless("it answers ERROR over TLS")
            return self._fallback(exc)
        except ClusterDiscoveryError as exc:
            return self._fallback(exc)
        now = self._clock()
        self._confirmed_at = now
        self._schedule_refresh(now)
        logger.info(
            "Discovered %s: config version %d, nodes %s",
            self.name,
            config.version,
            ", ".join(config.addresses),
        )
        return config

    def _serverless(self, reason: str) -> ClusterConfig:
        logger.info("%s is an ElastiCache Serverless cache (%s): its only node", self.name, reason)
        return ClusterConfig(version=0, nodes=(self._endpoint_as_node(),), serverless=True)

    def _fallback(self, error: ClusterDiscoveryError) -> ClusterConfig:
        """LOCATION itself as the only node, as IGNORE_CLUSTER_ERRORS asks; else raise."""
        if not self.options.ignore_cluster_errors:
            raise error
        logger.warning("%s; using %s as the only node (IGNORE_CLUSTER_ERRORS)", error, self.name)
        if not isinstance(error, DiscoveryNotSupported):
            self._schedule_refresh(self._clock())
        return ClusterConfig(version=0, nodes=(self._endpoint_as_node(),))

    def _endpoint_as_node(self) -> ClusterNode:
        return ClusterNode(hostname=self.endpoint.host, ip="", port=self.endpoint.port)

    # Refresh

    def _schedule_refresh(self, since: float) -> None:
        interval = self.options.refresh_interval
        if interval is None:
            self._next_refresh = math.inf
        else:
            self._next_refresh = since + interval * (1 - random.uniform(0, REFRESH_JITTER))

    def _start_refresh(self) -> None:
        # Claimed and started are set right after their steps, with no call in between: an
        # exception landing anywhere else (a signal handler's, as the lock is released or
        # the thread starts) finds the claim and lets the next interval try again, instead
        # of holding every refresh back for the whole ``_refresh_bound``.
        claimed = started = False
        try:
            with self._lock:
                now = self._clock()
                if now < self._refreshing_until or now < self._next_refresh:
                    return
                self._schedule_refresh(now)
                self._refreshing_until = now + self._refresh_bound()
                claimed = True
            self._run_in_background(self._refresh, f"refresh {self.name}")
            started = True
        except Exception:
            # The request that came due does not need the refresh: it is served with the
            # current list, and the next interval tries again.
            logger.exception("Could not start refreshing %s; keeping the node list", self.name)
        finally:
            if claimed and not started:
                self._refreshing_until = 0.0  # Let the next interval try again.

    def _refresh_bound(self) -> float:
        """
        More than a refresh can take (the endpoint, then up to ``MAX_NODES_ASKED`` known
        nodes, each resolved, connected to and read within DISCOVERY_TIMEOUT): past it, a
        refresh that never came to run no longer holds the next one back.
        """
        return (MAX_NODES_ASKED + 1) * 3 * self.options.discovery_timeout + 1.0

    def _refresh(self) -> None:
        """One refresh, in the background; whatever happens, the last good list stays."""
        try:
            config = self._ask_endpoint_or_nodes()
        except ClusterDiscoveryError as exc:
            self._refresh_failed(exc)
        except Exception as exc:
            logger.exception("Refreshing %s failed; keeping the node list", self.name)
            send(refresh_failed, ClusterTopology, endpoint=self.name, error=exc)
        else:
            self._take(config)
        finally:
            self._refreshing_until = 0.0

    def _ask_endpoint(self) -> ClusterConfig:
        """Discover once, remembering when the endpoint last answered or failed (wall clock)."""
        try:
            config = self._discover(
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

    def _ask_endpoint_or_nodes(self) -> ClusterConfig:
        """The endpoint's list; in an outage of the endpoint, the known nodes' list."""
        try:
            return self._ask_endpoint()
        except (EndpointUnreachable, EndpointTimeout) as outage:
            nodes = [node for node in self._held().nodes if node != self._endpoint_as_node()]
            if not nodes:
                raise
            try:
                config = discover_from_nodes(
                    nodes, self.options.discovery_timeout, self.options.tls, ask=self._discover
                )
            except ClusterDiscoveryError as exc:
                problem = f"{outage.problem}; asking the known nodes instead: {exc.problem}"
                raise type(outage)(outage.endpoint, problem, outage.received) from None
            logger.info("%s; the known nodes answered instead", outage)
            return config

    def _take(self, new: ClusterConfig) -> None:
        """Weigh a refreshed list by the version rules of the module docstring."""
        now = self._clock()
        old = self._held()
        if new.nodes == old.nodes:
            self._confirmed_at = now
            self._stale.clear()
        elif new.version > old.version:
            self._apply(new, now)
        elif self._stale.note(now):
            logger.warning(
                "Config version of %s went back from %d to %d in %d refreshes over %.0f s "
                "(the cluster was re-created?); taking the new list",
                self.name,
                old.version,
                new.version,
                self._stale.count,
                now - self._stale.since,
            )
            self._apply(new, now)
        else:
            logger.warning(
                "Ignoring stale node list from %s: config version %d is not above %d",
                self.name,
                new.version,
                old.version,
            )

    def _apply(self, new: ClusterConfig, now: float) -> None:
        """Make ``new`` the node list every backend switches to: the one place it changes."""
        old = self._held()
        self._config = new
        self._confirmed_at = now
        self._stale.clear()
        logger.info(
            "Node list of %s changed: version %d [%s] -> version %d [%s]",
            self.name,
            old.version,
            ", ".join(old.addresses),
            new.version,
            ", ".join(new.addresses),
        )
        send(node_list_changed, ClusterTopology, endpoint=self.name, old=old, new=new)

    def _refresh_failed(self, error: ClusterDiscoveryError) -> None:
        """A refresh gave no list: the one place that happens; the last good list stays."""
        logger.warning("%s; keeping config version %d", error, self._held().version)
        self.last_error, self.last_error_time = error, time.time()
        send(refresh_failed, ClusterTopology, endpoint=self.name, error=error)

    def _held(self) -> ClusterConfig:
        """The current list, which exists whenever a refresh runs."""
        config = self._config
        if config is None:
            raise RuntimeError(f"{self.name} has no node list to refresh")
        return config

    # Fork

    def _after_fork_in_child(self) -> None:
        """
        Start the child clean: fresh locks, no inherited work in flight, and the node list
        as a new object so that backends build their own connections. The list is as old
        as the parent's last confirmation, so a child of an idle parent refreshes at once.
        """
        next_refresh = self._next_refresh
        self._reset_machinery()
        if self._config is None:
            return
        self._config = dataclasses.replace(self._config)
        if next_refresh != math.inf:
            self._schedule_refresh(self._confirmed_at)
            self._next_refresh = min(self._next_refresh, next_refresh)


_topologies: dict[tuple[Endpoint, DiscoverySettings], ClusterTopology] = {}
_topologies_lock = threading.Lock()


def topology_for(endpoint: Endpoint, options: DiscoverySettings) -> ClusterTopology:
    """
    The process's one topology for this endpoint and these discovery settings: aliases that
    differ only in other options share it.
    """
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


forks.after_fork_in_child(_after_fork_in_child)
