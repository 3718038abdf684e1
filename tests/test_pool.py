"""
The rules of one node's client pool, with stand-in clients: the bound, waiting for a client,
node health, retirement and fork. The end-to-end behaviour on real memcached is in
test_concurrency.py and test_placement.py.
"""

from __future__ import annotations

import gc
import signal
import threading
import time

import pytest
from support import ForkedChild, Interrupted

from django_elasticache import pool as pool_module
from django_elasticache.cluster_utils import ClusterNode
from django_elasticache.pool import NodePool, NodeUnavailable, PoolExhausted

NODE = ClusterNode(hostname="node-1.example", ip="10.0.0.1", port=11211)


class Connection:
    """A stand-in client that records whether it was closed."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.closed = False


def close(connection: Connection) -> None:
    connection.closed = True


def never_a_node_failure(error: BaseException) -> bool:
    return False


def always_a_node_failure(error: BaseException) -> bool:
    return True


def borrowed_in_another_thread(pool: NodePool) -> Connection:
    """A client lent to a thread that is over: still lent, and not this thread's."""
    lent: list[Connection] = []
    borrower = threading.Thread(target=lambda: lent.append(pool.borrow()))
    borrower.start()
    borrower.join()
    return lent[0]


@pytest.fixture
def short_waits(monkeypatch):
    monkeypatch.setattr(pool_module, "BORROW_TIMEOUT", 0.2)
    monkeypatch.setattr(pool_module, "RETRY_AFTER", 0.2)


def test_clients_are_reused_one_borrower_at_a_time() -> None:
    pool = NodePool(NODE, Connection, close, size=4)
    lent = [borrowed_in_another_thread(pool)]
    first = pool.borrow()
    assert first is not lent[0]
    pool.give_back(first)
    assert pool.borrow() is first
    assert pool.open_count == 2


def test_a_full_pool_makes_a_borrower_wait_then_raise(short_waits) -> None:
    pool = NodePool(NODE, Connection, close, size=1)
    lent = [borrowed_in_another_thread(pool)]
    with pytest.raises(PoolExhausted, match=r"node-1\.example:11211.*POOL_SIZE"):
        pool.borrow()
    threading.Timer(0.05, pool.give_back, args=(lent[0],)).start()
    assert pool.borrow() is lent[0]  # a client given back wakes the waiting borrower
    assert pool.open_count == 1


def test_node_failures_mark_the_node_down_then_let_calls_try_again(short_waits) -> None:
    pool = NodePool(NODE, Connection, close, size=4)
    for _ in range(pool_module.FAILURE_LIMIT):
        with pytest.raises(OSError), pool.client(always_a_node_failure):
            raise OSError("connection refused")
    with pytest.raises(NodeUnavailable, match=r"node-1\.example:11211"):
        pool.borrow()
    assert pool.open_count == 0  # a failed connection is closed, never pooled
    time.sleep(0.25)
    with pool.client(always_a_node_failure):
        pass  # tried again after RETRY_AFTER, and a success heals the node
    with pool.client(always_a_node_failure):
        pass


def test_errors_that_are_not_node_failures_keep_the_client() -> None:
    pool = NodePool(NODE, Connection, close, size=4)
    with pytest.raises(ValueError), pool.client(never_a_node_failure) as client:
        raise ValueError("a caller's mistake")
    assert not client.closed and pool.borrow() is client


def test_retired_pool_closes_idle_clients_now_and_lent_ones_on_return() -> None:
    pool = NodePool(NODE, Connection, close, size=4)
    idle, lent = pool.borrow(), pool.borrow()
    pool.give_back(idle)
    pool.retire()
    assert idle.closed and not lent.closed
    pool.give_back(lent)
    assert lent.closed and pool.open_count == 0


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_never_touches_the_parents_clients() -> None:
    pool = NodePool(NODE, Connection, close, size=4)
    inherited = pool.borrow()
    pool.give_back(inherited)

    def in_child() -> str:
        fresh = pool.borrow()
        return f"{fresh is not inherited} {inherited.closed}"

    assert ForkedChild(in_child).report() == "True False"
    assert pool.borrow() is inherited  # the parent's pool is as it was


def test_an_interruption_that_is_not_an_exception_closes_the_client() -> None:
    """A KeyboardInterrupt may come between a request and its reply: never pooled again."""
    pool = NodePool(NODE, Connection, close, size=4)
    with pytest.raises(KeyboardInterrupt), pool.client(never_a_node_failure) as client:
        raise KeyboardInterrupt
    assert client.closed and pool.open_count == 0


def test_a_client_dropped_without_being_given_back_frees_its_slot(short_waits) -> None:
    """As when an exception lands between ``borrow`` and the call's ``try``."""
    pool = NodePool(NODE, Connection, close, size=1)
    pool.borrow()  # and dropped
    assert pool.open_count == 0
    assert pool.borrow() is not None


def test_a_waiting_borrower_takes_the_slot_of_a_client_dropped_meanwhile() -> None:
    pool = NodePool(NODE, Connection, close, size=1)
    held = [pool.borrow()]
    threading.Timer(0.05, held.clear).start()
    assert pool.borrow() is not None  # woken by no give_back, well within BORROW_TIMEOUT


def test_a_lost_client_held_by_a_reference_cycle_is_collected_before_giving_up(
    short_waits,
) -> None:
    pool = NodePool(NODE, Connection, close, size=1)
    cycle: list[object] = [pool.borrow()]
    cycle.append(cycle)
    del cycle
    gc.disable()
    try:
        assert pool.open_count == 1
        assert pool.borrow() is not None
    finally:
        gc.enable()


def test_a_lost_client_its_caller_keeps_alive_frees_its_slot_for_the_same_thread(
    short_waits,
) -> None:
    """
    A caller that keeps the exception of an interrupted call keeps its frames, and the lost
    client in them, alive: the next borrow by the same thread closes it and takes its slot
    (no call borrows two clients of one node, so that thread cannot be using it).
    """
    pool = NodePool(NODE, Connection, close, size=1)
    kept = pool.borrow()  # lent, never handed back, still referenced
    client = pool.borrow()
    assert kept.closed and not client.closed
    assert pool.open_count == 1


def test_a_client_lent_to_another_thread_is_never_taken_from_it(short_waits) -> None:
    pool = NodePool(NODE, Connection, close, size=1)
    lent = [borrowed_in_another_thread(pool)]
    with pytest.raises(PoolExhausted):
        pool.borrow()
    assert not lent[0].closed and pool.open_count == 1


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
@pytest.mark.parametrize("keep_errors", [False, True], ids=["dropped", "kept"])
# An interruption may land in a garbage collector callback (hypothesis installs one), where
# Python reports it as unraisable and drops it: the loop below arms the next one anyway.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_interruptions_landing_anywhere_in_borrow_and_give_back_lose_no_slot(
    short_waits, keep_errors
) -> None:
    """
    A timer's signal raises every 50 us while calls borrow and give back clients, so that
    interruptions land all over ``borrow``, ``give_back`` and the code between them. A caller
    may keep the exceptions, and with them every frame and client they reference.
    """
    pool = NodePool(NODE, Connection, close, size=1)
    interruptions = 0
    armed = [False]

    def interrupt(signum: int, frame: object) -> None:
        if armed[0]:
            armed[0] = False  # Once, until the loop below arms it again.
            raise Interrupted

    deadline = time.monotonic() + 2
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.00005, 0.00005)

    def calls() -> None:
        """
        Calls as ``routing`` makes them, until one is interrupted. Armed again before each
        call: Python drops an exception a handler raises inside a weakref callback (a lost
        client collected), and the loop must not wait for one that never comes.
        """
        while time.monotonic() < deadline:
            armed[0] = True
            client = None
            try:
                client = pool.borrow()
                assert not client.closed
                pool.give_back(client)
            except BaseException as error:
                if client is not None:
                    pool.give_back_after(client, error, never_a_node_failure)
                raise

    kept: list[Interrupted] = []
    try:
        while interruptions < 3000 and time.monotonic() < deadline:
            try:
                calls()
            except Interrupted as error:
                interruptions += 1
                if keep_errors:
                    kept.append(error)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interruptions > 100
    if not keep_errors:
        assert pool.open_count == len(pool._idle) <= 1
    # A client kept alive by a kept exception is this thread's to reclaim: the next borrow
    # gets a working client, and the pool is back to one idle client, whatever was kept.
    client = pool.borrow()
    assert not client.closed
    pool.give_back(client)
    assert pool.open_count == len(pool._idle) == 1
