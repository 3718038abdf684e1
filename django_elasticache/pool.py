"""
The process's client connections to each cache node, shared by every thread and request.

Client libraries are not thread-safe, and Django hands one backend instance to every thread
that shares a context (an ASGI server, a context-propagating executor), so a client per backend
instance is not safe. Here each node has a pool of idle clients: a call borrows one, uses it
alone and gives it back, so no client is ever used by two threads at once, and connections
outlive requests (a fresh thread or request context reuses them).

A node's pool also keeps the node's health for the whole process: after ``FAILURE_LIMIT``
connection failures in a row the node is marked down for ``RETRY_AFTER`` seconds, and calls for
its keys fail at once with ``NodeUnavailable`` instead of each thread waiting on it or writing
the key elsewhere.

A forked child never touches the parent's sockets: its pools start empty, and the clients it
inherited are kept referenced, never closed, because closing sends ``quit`` on a connection the
parent still uses.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .cluster_utils import ClusterNode, format_address

__all__ = ["FAILURE_LIMIT", "RETRY_AFTER", "NodePool", "NodeUnavailable"]

FAILURE_LIMIT = 2
"""Connection failures in a row after which a node is marked down."""

RETRY_AFTER = 2.0
"""Seconds a node marked down is skipped before a call may try it again."""

Client = Any
"""A client of the backend's library connected to one node."""


class NodeUnavailable(Exception):
    """
    The node that holds the key failed recently and is not tried again yet. The key is not
    written to another node: its value there would be stale once the node is back.
    """

    def __init__(self, node: ClusterNode, retry_in: float) -> None:
        self.node = node
        self.node_name = format_address(node.hostname or node.ip, node.port)
        super().__init__(
            f"Cache node {self.node_name} is marked down after {FAILURE_LIMIT} failures in a row; "
            f"tried again in {retry_in:.1f} s"
        )


class NodePool:
    """
    Idle clients of one node, at most ``max_idle`` of them, and the node's health.

    A borrower that finds no idle client makes a new one, so a burst is never blocked; a client
    given back to a full pool is closed, so the pool never holds more than ``max_idle``
    connections between bursts.
    """

    def __init__(
        self,
        node: ClusterNode,
        make_client: Callable[[ClusterNode], Client],
        close_client: Callable[[Client], None],
        max_idle: int,
    ) -> None:
        self.node = node
        self._make_client = make_client
        self._close_client = close_client
        self._max_idle = max_idle
        self._idle: list[Client] = []
        self._lock = threading.Lock()
        self._retired = False
        self._failures = 0
        self._down_until = 0.0
        _live_pools.add(self)

    @contextlib.contextmanager
    def client(self, is_node_failure: Callable[[BaseException], bool]) -> Iterator[Client]:
        """
        Lend a client for one call. A connection failure counts against the node's health and
        the client is dropped rather than pooled, since its connection state is unknown.
        """
        self.check_available()
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = self._make_client(self.node)
        try:
            yield client
        except BaseException as error:
            if is_node_failure(error):
                self.record_failure()
                self._close_client(client)
                raise
            self._give_back(client)
            raise
        self.record_success()
        self._give_back(client)

    # The node's health, shared by every path that talks to the node (sync clients here,
    # the event loops' connections in ``async_client``).

    def check_available(self) -> None:
        """Raise ``NodeUnavailable`` while the node is marked down."""
        if self._failures >= FAILURE_LIMIT:
            self._refuse_while_down()

    def record_failure(self) -> None:
        """The node could not be reached: enough of these in a row mark it down."""
        self._failures += 1
        if self._failures >= FAILURE_LIMIT:
            self._down_until = time.monotonic() + RETRY_AFTER

    def record_success(self) -> None:
        """The node answered: its run of failures is over."""
        self._failures = 0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def retire(self) -> None:
        """The node left the node list: close idle clients now, borrowed ones when given back."""
        with self._lock:
            self._retired = True
            idle, self._idle = self._idle, []
        for client in idle:
            self._close_client(client)

    def _give_back(self, client: Client) -> None:
        with self._lock:
            if not self._retired and len(self._idle) < self._max_idle:
                self._idle.append(client)
                return
        self._close_client(client)

    def _refuse_while_down(self) -> None:
        remaining = self._down_until - time.monotonic()
        if remaining > 0:
            raise NodeUnavailable(self.node, remaining)
        # The wait is over: let calls try the node again, one failure marks it down again.
        self._failures = FAILURE_LIMIT - 1

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        _clients_inherited_across_fork.extend(self._idle)
        self._idle = []
        self._failures = 0
        self._down_until = 0.0


_live_pools: weakref.WeakSet[NodePool] = weakref.WeakSet()
_clients_inherited_across_fork: list[Client] = []


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
