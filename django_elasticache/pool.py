"""
The process's client connections to each cache node, shared by every thread and request.

Client libraries are not thread-safe, and Django hands one backend instance to every thread
that shares a context (an ASGI server, a context-propagating executor), so a client per backend
instance is not safe. Here each node has a bounded pool of clients: a call borrows one, uses it
alone and gives it back, so no client is ever used by two threads at once, and connections
outlive requests (a fresh thread or request context reuses them).

A node's pool also keeps the node's health for the whole process: after ``FAILURE_LIMIT``
connection failures in a row the node is marked down for ``RETRY_AFTER`` seconds, and calls for
its keys fail at once with ``NodeUnavailable`` instead of each thread waiting on it or writing
the key elsewhere.

A call may be interrupted at any point: by an error of the client library, but also by an
exception raised from outside the call (Ctrl-C's ``KeyboardInterrupt``, a ``gevent.Timeout`` or
``Greenlet.kill`` in a gevent worker, a signal handler raising for a request timeout). Two rules
keep such an interruption from ever giving a later call a wrong value or a lost slot:

- **A client is pooled again only if its connection is known to be in step**: its call
  completed, or raised an ``Exception`` after which the next request's reply is the next thing
  on the wire. Both backends' clients make every ``Exception`` such an exception, each for its
  own reason (see ``memcached.PipelinedClient`` and ``pymemcache._NodeClient``): a failure
  while sending or reading closes the socket it happened on, and a refusal is read in full.
  Anything else (a ``BaseException`` that is not an ``Exception``) may have left a request
  sent and its reply unread, so the client is closed (``NodePool.give_back_after``). So is a
  client that says it owes replies (``replies_owed``): a call that sends to every node
  before it reads any reply owes them from its first write to the end of its reading, and
  an exception may land anywhere in between.
- **A slot is never lost**: the number of a node's clients is not a counter that a lost client
  would never decrement, but the number of clients alive (``NodePool.open_count``). A client
  dropped without being given back, wherever an exception landed in ``borrow``,
  ``give_back`` or between them, is freed by the garbage collector (at once, by CPython's
  reference counting, unless a reference cycle holds it), its socket closed with it, and its
  slot is free again. A caller that keeps the exception keeps the call's frames, and the
  client in them, alive: the next time the same thread (or greenlet) waits for a client of
  that node, the clients still lent to it are closed and their slots taken back, since no
  call borrows two clients of one node at once.

A forked child never touches the parent's sockets: its pools start empty, and the clients it
inherited are kept referenced, never closed, because closing sends ``quit`` on a connection the
parent still uses.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from . import forks
from .cluster_utils import ClusterNode, format_address

__all__ = [
    "BORROW_TIMEOUT",
    "FAILURE_LIMIT",
    "RETRY_AFTER",
    "NodeError",
    "NodePool",
    "NodeUnavailable",
    "PoolExhausted",
]

FAILURE_LIMIT = 2
"""Connection failures in a row after which a node is marked down."""

RETRY_AFTER = 2.0
"""Seconds a node marked down is skipped before a call may try it again."""

BORROW_TIMEOUT = 1.0
"""Seconds a call waits for a client of a node whose every client is in use."""

FREED_SLOT_POLL = 0.02
"""
Seconds between two looks at the pool by a waiting borrower. A client given back wakes it at
once; a slot freed by a client collected without being given back wakes nobody (a collector
callback may run in a thread that holds the pool's lock), nor does a wake-up lost to an
interrupted waiter, so a waiter also looks this often.
"""

Client = Any
"""A client of the backend's library connected to one node."""


class NodeError(Exception):
    """A call could not be given a client of the node that holds its key."""

    def __init__(self, node: ClusterNode, message: str) -> None:
        self.node = node
        self.node_name = format_address(node.hostname or node.ip, node.port)
        super().__init__(f"Cache node {self.node_name}: {message}")


class NodeUnavailable(NodeError):
    """
    The node that holds the key failed recently and is not tried again yet. The key is not
    written to another node: its value there would be stale once the node is back.
    """

    def __init__(self, node: ClusterNode, retry_in: float) -> None:
        super().__init__(
            node,
            f"marked down after {FAILURE_LIMIT} failures in a row; "
            f"tried again in {retry_in:.1f} s",
        )


class PoolExhausted(NodeError):
    """Every client of a node stayed in use for ``BORROW_TIMEOUT`` seconds."""

    def __init__(self, node: ClusterNode, size: int) -> None:
        super().__init__(
            node,
            f"all {size} clients stayed busy for "
            f"{BORROW_TIMEOUT} s; raise OPTIONS['POOL_SIZE'] if this process runs more "
            "concurrent cache calls",
        )


class NodePool:
    """
    The clients of one node, at most ``size`` of them, and the node's health.

    A borrower takes an idle client, or makes one while fewer than ``size`` exist, or waits
    for one to be given back: the number of connections a process opens to a node is bounded
    whatever its concurrency, and connections are reused rather than churned.

    The compiled single-key call (``routing.pooled_call``), and the compiled ``borrow`` and
    ``give_back`` of the calls over every node (``routing.borrow``, ``routing.give_back``),
    do the common case of ``borrow`` and ``give_back`` themselves, on the same attributes: a
    change to what they do under the lock is a change to ``_speedups.c`` too
    (``tests/test_pooled_call.py`` runs both).
    """

    def __init__(
        self,
        node: ClusterNode,
        make_client: Callable[[ClusterNode], Client],
        close_client: Callable[[Client], None],
        size: int,
    ) -> None:
        self.node = node
        self._make_client = make_client
        self._close_client = close_client
        self._size = size
        self._idle: list[Client] = []
        # Every client of the node that is still alive, idle or lent: a lent client dropped
        # without being given back leaves it when collected (see the module docstring).
        self._alive: weakref.WeakSet[Client] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._waiting = 0
        self._make_bell()
        self._retired = False
        self._failures = 0
        self._down_until = 0.0
        _live_pools.add(self)

    def borrow(self) -> Client:
        """
        A client for one call, to be handed back with ``give_back`` or ``discard``. Raises
        ``NodeUnavailable`` while the node is marked down.
        """
        if self._failures >= FAILURE_LIMIT:  # ``check_available``, inline on the hot path.
            self._refuse_while_down()
        with self._lock:
            idle = self._idle
            if idle:
                # ``_lend_idle``, inline: marked lent before it leaves the idle list.
                client = idle[-1]
                client._lent_to = threading.get_ident()
                idle.pop()
                return client
        return self._take_when_none_idle()

    def give_back(self, client: Client) -> None:
        """The call succeeded: the node is healthy and the client ready for the next call."""
        try:
            self._failures = 0  # ``record_success``, inline on the hot path.
            with self._lock:
                if not self._retired:
                    self._idle.append(client)
                    client._lent_to = None
                    if self._waiting:
                        self._ring()
                    return
            self.discard(client)
        except BaseException:
            self._settle_interrupted(client)
            raise

    def give_back_after(
        self,
        client: Client,
        error: BaseException,
        is_node_failure: Callable[[BaseException], bool],
    ) -> None:
        """
        The call raised ``error``: the one place that decides whether its client is pooled
        again. A connection failure counts against the node's health and closes the client.
        Any other ``Exception`` leaves the client in step (the backends' clients close a
        socket an error interrupted, see the module docstring), so it is pooled again, unless
        the client owes replies (``replies_owed``). An
        interruption that is not an ``Exception`` (``KeyboardInterrupt``, ``gevent.Timeout``,
        ``SystemExit``) may have come between a request and its reply: the client is closed.
        """
        try:
            if self._is_settled(client):
                return
            if not isinstance(error, Exception):
                self.discard(client)
            elif is_node_failure(error):
                self.record_failure()
                self.discard(client)
            elif getattr(client, "replies_owed", False):
                self.discard(client)  # Interrupted between a request and its reply.
            else:
                self.give_back(client)
        except BaseException:
            self._settle_interrupted(client)
            raise

    def discard_after(
        self,
        client: Client,
        error: BaseException,
        is_node_failure: Callable[[BaseException], bool],
    ) -> None:
        """
        The call raised ``error`` at a point where its requests may have gone out unanswered
        (a multi-node call interrupted after sending, before its reader was kept): the
        client is closed whatever the error, and a connection failure still counts against
        the node.
        """
        try:
            if isinstance(error, Exception) and is_node_failure(error):
                self.record_failure()
        finally:
            self.discard(client)

    @contextlib.contextmanager
    def client(self, is_node_failure: Callable[[BaseException], bool]) -> Iterator[Client]:
        """``borrow`` and the matching hand-back around a block, for calls off the hot path."""
        client = None
        try:
            client = self.borrow()
            yield client
            self.give_back(client)
        except BaseException as error:
            if client is not None:
                self.give_back_after(client, error, is_node_failure)
            raise

    # The node's health, shared by every path that talks to the node (the pooled clients
    # here, the event loops' connections in ``async_client``).

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
    def open_count(self) -> int:
        """Clients of this node that exist now, idle or lent."""
        return self._count_alive()

    def retire(self) -> None:
        """The node left the node list: close idle clients now, lent ones when given back."""
        with self._lock:
            self._retired = True
        self.close_idle()

    def close_idle(self) -> None:
        """
        Close the clients nobody is using; the next calls connect afresh. Lent clients stay
        with their borrowers: closing them would break a call in another thread.
        """
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            self.discard(client)

    def _take_when_none_idle(self) -> Client:
        """
        An idle client given back meanwhile, or a new one while fewer than ``size`` are
        alive, or ``PoolExhausted`` after ``BORROW_TIMEOUT``. The slot of a new client is
        held from the moment it is counted: the placeholder object stands for it while the
        connection is made outside the lock, and frees the slot by being dropped, however
        the making ends.

        A waiter sleeps on the pool's bell, a lock that ``give_back`` and ``discard``
        release (``_ring``), rather than on a ``threading.Condition``, whose ``wait`` an
        exception landing at the wrong bytecode leaves with its lock released twice.
        """
        borrower = threading.get_ident()
        placeholder = _Placeholder()
        placeholder._lent_to = borrower
        deadline = time.monotonic() + BORROW_TIMEOUT
        collected = False
        while True:
            with self._lock:
                if self._idle:
                    return self._lend_idle(borrower)
                lost = self._forget_lost_to(borrower) if self._count_alive() >= self._size else []
                if self._count_alive() < self._size:
                    self._alive.add(placeholder)
                    break
                self._waiting += 1
                if self._bell_made_by is not threading.Lock:
                    self._make_bell()
                bell = self._bell
            try:
                for client in lost:
                    self._close_client(client)
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    bell.acquire(timeout=min(remaining, FREED_SLOT_POLL))
                elif not collected:
                    # A client lost by an interrupted call may be held by a reference cycle
                    # (a traceback and its frames): collect it before calling the pool full.
                    collected = True
                    gc.collect()
                else:
                    raise PoolExhausted(self.node, self._size)
            finally:
                with self._lock:
                    self._waiting -= 1
        for client in lost:
            self._close_client(client)
        client = None
        try:
            client = self._make_client(self.node)
            client._lent_to = borrower
            with self._lock:
                self._alive.add(client)
                self._alive.discard(placeholder)
        except BaseException:
            # The frame, and the placeholder in it, may outlive the call in a traceback.
            with self._lock:
                self._alive.discard(placeholder)
            if client is not None:
                self.discard(client)
            raise
        return client

    def discard(self, client: Client) -> None:
        """Close a borrowed client whose connection is out of step, without judging the node."""
        with self._lock:
            self._alive.discard(client)
            client._lent_to = None
            if self._waiting:
                self._ring()
        self._close_client(client)

    def _count_alive(self) -> int:
        """
        The clients alive, counted one by one: ``len`` of a ``WeakSet`` would also count a
        collected client whose removal was cut short (an exception raised in the weakref
        callback by a signal handler is dropped by Python, and the dead reference stays).
        """
        return sum(1 for _ in self._alive)

    def _lend_idle(self, borrower: int) -> Client:
        """
        The last idle client, marked as lent to ``borrower`` before it leaves the idle list,
        so that wherever an exception lands, it is either still idle or known as lent.
        Called with the lock held.
        """
        client = self._idle[-1]
        client._lent_to = borrower
        self._idle.pop()
        return client

    def _forget_lost_to(self, borrower: int) -> list[Client]:
        """
        The clients lent to ``borrower`` and never handed back, forgotten (with the lock
        held) so that their slots are free; the caller closes them. No call borrows two
        clients of one node at once, so a thread (or greenlet) that waits for a client of
        this node uses none: any still lent to it was lost by an interrupted call, its
        reply perhaps still on the wire, and kept alive by a traceback its caller keeps.
        """
        lost = [
            client
            for client in self._alive
            if getattr(client, "_lent_to", None) == borrower and not self._is_idle(client)
        ]
        for client in lost:
            self._alive.discard(client)
        return [client for client in lost if not isinstance(client, _Placeholder)]

    def _settle_interrupted(self, client: Client) -> None:
        """
        A hand-back was interrupted: unless the client made it into the pool (or was closed
        already), close it and free its slot now. Its caller's frame may outlive the call in
        a traceback someone keeps, and the client with it, so its collection cannot be
        counted on.
        """
        if not self._is_settled(client):
            self.discard(client)

    def _is_settled(self, client: Client) -> bool:
        """
        Whether the client's hand-back is over: it is idle (given back before the error
        landed, its call having completed), or no longer counted (closed by an interrupted
        ``give_back``, which settled it, or taken back as lost by a waiting borrower). A
        closed client pooled again would be used past its slot, and over the pool's size.
        """
        with self._lock:
            return self._is_idle(client) or client not in self._alive

    def _is_idle(self, client: Client) -> bool:
        """Whether the client is among the idle ones; with the lock held."""
        return any(idle is client for idle in self._idle)

    def _ring(self) -> None:
        """Wake one waiting borrower (or the next to wait, if none sleeps yet)."""
        with contextlib.suppress(RuntimeError):  # Rung already, not yet heard.
            self._bell.release()

    def _make_bell(self) -> None:
        """
        A new bell: a lock held from the start, which a release lets one ``acquire`` through.
        A waiter makes it anew if ``threading.Lock`` is no longer what made it: gevent's
        monkey-patching replaces it, and a gunicorn gevent worker is forked first, patched
        after. A pool the parent used (``--preload``, an application that used the cache as
        it loaded) got its bell from the fork hook before the patch, a lock of the OS thread;
        a greenlet waiting on that stops every greenlet of the worker, those that would give
        a client back too, until its wait times out.
        """
        self._bell_made_by: object = threading.Lock
        self._bell = threading.Lock()
        self._bell.acquire()

    def _refuse_while_down(self) -> None:
        remaining = self._down_until - time.monotonic()
        if remaining > 0:
            raise NodeUnavailable(self.node, remaining)
        # The wait is over: let calls try the node again, one failure marks it down again.
        self._failures = FAILURE_LIMIT - 1

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0
        self._make_bell()
        _clients_inherited_across_fork.extend(self._idle)
        self._idle = []
        self._alive = weakref.WeakSet()
        self._failures = 0
        self._down_until = 0.0


class _Placeholder:
    """The slot of a client being made, counted among the alive until the client is."""

    _lent_to: int


_live_pools: weakref.WeakSet[NodePool] = weakref.WeakSet()
_clients_inherited_across_fork: list[Client] = []


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork_in_child()


forks.after_fork_in_child(_after_fork_in_child)
