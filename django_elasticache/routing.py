"""
One node list's clients behind the interface of a single client library object.

Django's memcached backends call ``self._cache.get(...)``, ``set_multi(...)`` and so on on one
client over every server. ``ClusterClient`` offers those calls, but routes each key to the node
its backend's ``Placement`` names and runs the call on a client of that node borrowed from the
node's ``NodePool``. Placement is the backend's (it must match the library's own hashing, for
the sync and the async path alike); routing and pooling are the same for every library.

After the node list changes, a key may have a new owner while its old copy stays on its former
owner, which becomes the owner again if the change is undone (scale-out, then scale-in): a key
deleted in between would come back. So for ``invalidation_window`` seconds after a change,
every write or delete of a key whose owner changed also deletes it on its former owner, if that
node is still in the list. The window is the cache's default timeout: by then the old copies
written with it have expired.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from .cluster_utils import ClusterConfig, ClusterNode
from .pool import NodePool

__all__ = ["ClusterClient", "ClusterClients", "Placement", "cluster_clients"]

SERVERLESS_MAX_REQUEST = 16 * 1024
"""Bytes of one multi-key request that ElastiCache Serverless for memcached accepts."""

logger = logging.getLogger("django_elasticache")


class Placement(Protocol):
    """Which node of a node list holds a key: an index into ``ClusterConfig.nodes``."""

    def node_index(self, key: str) -> int: ...


NodeKey = tuple[str, int]


def node_identity(node: ClusterNode) -> NodeKey:
    """A node is its hostname and port; its IP changes when ElastiCache replaces it."""
    return (node.hostname or node.ip, node.port)


def _start_get_multi(client: Any, keys: list[str]) -> Callable[[], dict[str, Any]]:
    """
    A node's ``get_multi``, sent now if its client can split it: ``start_get_multi(keys)``
    sends the request and returns the function that reads the reply. Other clients run
    ``get_multi`` when the reply is asked for.
    """
    start = getattr(client, "start_get_multi", None)
    if start is None:
        return functools.partial(client.get_multi, keys)
    return start(keys)


class ClusterClient:
    """
    The library-client calls Django's memcached backends make, over every node of ``config``.

    Single-key calls go to the key's node; multi-key calls are split by node and their results
    merged; ``flush_all`` reaches every node, and raises the first error once all were tried.
    """

    def __init__(
        self,
        config: ClusterConfig,
        pools: Sequence[NodePool],
        placement: Placement,
        is_node_failure: Callable[[BaseException], bool],
        previous: ClusterClient | None = None,
        invalidation_window: float | None = None,
    ) -> None:
        self.config = config
        self._pools = list(pools)
        self._placement = placement
        self._is_node_failure = is_node_failure
        self._single = self._pools[0] if len(self._pools) == 1 else None
        self._former_owners: list[NodePool | None] | None = None
        self._former_placement: Placement | None = None
        self._invalidate_until = 0.0
        if previous is not None and invalidation_window != 0:
            self._remember_former_owners(previous, invalidation_window)

    @property
    def pools(self) -> tuple[NodePool, ...]:
        """Each node's pool, in the order of ``config.nodes``."""
        return tuple(self._pools)

    def pool_for(self, key: str) -> NodePool:
        if self._single is not None:
            return self._single
        return self._pools[self._placement.node_index(key)]

    def _remember_former_owners(self, previous: ClusterClient, window: float | None) -> None:
        by_identity = {node_identity(pool.node): pool for pool in self._pools}
        self._former_owners = [by_identity.get(node_identity(p.node)) for p in previous._pools]
        self._former_placement = previous._placement
        self._invalidate_until = float("inf") if window is None else time.monotonic() + window

    # Single-key calls

    def _call(self, key: str, method: str, *args: Any) -> Any:
        pool = self.pool_for(key)
        client = pool.borrow()
        try:
            result = getattr(client, method)(key, *args)
        except BaseException as error:
            pool.give_back_after(client, error, self._is_node_failure)
            raise
        pool.give_back(client)
        return result

    def get(self, key: str, *args: Any) -> Any:
        return self._call(key, "get", *args)

    def touch(self, key: str, *args: Any) -> Any:
        return self._call(key, "touch", *args)

    def incr(self, key: str, *args: Any) -> Any:
        return self._call(key, "incr", *args)

    def decr(self, key: str, *args: Any) -> Any:
        return self._call(key, "decr", *args)

    def set(self, key: str, *args: Any) -> Any:
        self._invalidate_former_owners((key,))
        return self._call(key, "set", *args)

    def add(self, key: str, *args: Any) -> Any:
        self._invalidate_former_owners((key,))
        return self._call(key, "add", *args)

    def delete(self, key: str, *args: Any) -> Any:
        self._invalidate_former_owners((key,))
        return self._call(key, "delete", *args)

    # Multi-key calls

    def by_pool(self, keys: Iterable[str]) -> dict[NodePool, list[str]]:
        """The keys grouped by the pool of their node (the async path groups alike)."""
        if self._single is not None:
            return {self._single: list(keys)}
        groups: list[list[str]] = [[] for _ in self._pools]
        node_index = self._placement.node_index
        for key in keys:
            groups[node_index(key)].append(key)
        return {pool: group for pool, group in zip(self._pools, groups, strict=True) if group}

    def get_multi(self, keys: Iterable[str], *args: Any) -> dict[str, Any]:
        groups = self.by_pool(keys)
        if len(groups) > 1 and not args and not self.config.serverless:
            return self._get_multi_from_all_at_once(groups)
        found: dict[str, Any] = {}
        for pool, node_keys in groups.items():
            with pool.client(self._is_node_failure) as client:
                for batch in self.get_batches(node_keys):
                    found.update(client.get_multi(batch, *args))
        return found

    def _get_multi_from_all_at_once(self, groups: Mapping[NodePool, list[str]]) -> dict[str, Any]:
        """
        ``get_multi`` over several nodes in one round trip, as libmemcached's multi-server
        ``get_multi`` does: every node's request is sent before any reply is read, so the
        nodes answer in parallel, where the node client can split its ``get_multi``
        (``_start_get_multi``); other clients' ``get_multi`` runs node after node.

        A node that fails does not stop the others: every other node's reply is still read
        (its connection stays in step and is pooled again, the node counted healthy), then
        the first error is raised, of the class the one-node ``get_multi`` raises for it.
        The values read from the live nodes are not returned: with IGNORE_EXCEPTIONS the
        whole ``get_many`` is a miss, as on the event-loop path. (Serverless caches have one
        node, so their batches never come here.)
        """
        first_error: Exception | None = None
        started: list[tuple[NodePool, Any, Callable[[], dict[str, Any]]]] = []
        found: dict[str, Any] = {}
        try:
            for pool, node_keys in groups.items():
                try:
                    client = pool.borrow()
                except Exception as error:
                    first_error = first_error or error
                    continue
                try:
                    started.append((pool, client, _start_get_multi(client, node_keys)))
                except BaseException as error:
                    pool.give_back_after(client, error, self._is_node_failure)
                    if not isinstance(error, Exception):
                        raise
                    first_error = first_error or error
            while started:
                # Taken off the list first: a client is handed back once, whatever interrupts.
                pool, client, read_reply = started.pop(0)
                try:
                    found.update(read_reply())
                except BaseException as error:
                    pool.give_back_after(client, error, self._is_node_failure)
                    if not isinstance(error, Exception):
                        raise
                    first_error = first_error or error
                else:
                    pool.give_back(client)
        finally:
            for pool, client, _ in started:
                pool.discard(client)  # Interrupted: its reply is still on the wire.
        if first_error is not None:
            raise first_error
        return found

    def get_batches(self, keys: list[str]) -> Iterator[list[str]]:
        """
        The keys in batches whose ``get`` line fits ElastiCache Serverless's limit on a
        multi-key request; one batch elsewhere.
        """
        if not self.config.serverless:
            yield keys
            return
        batch: list[str] = []
        size = len(b"get \r\n")
        for key in keys:
            key_size = len(key.encode()) + 1
            if batch and size + key_size > SERVERLESS_MAX_REQUEST:
                yield batch
                batch, size = [], len(b"get \r\n")
            batch.append(key)
            size += key_size
        yield batch

    def set_multi(self, mapping: Mapping[str, Any], *args: Any, **kwargs: Any) -> list[str]:
        self._invalidate_former_owners(mapping)
        failed: list[str] = []

        def store(client: Any, node_keys: list[str]) -> None:
            failed.extend(
                client.set_multi({key: mapping[key] for key in node_keys}, *args, **kwargs)
            )

        self._on_every_node(self.by_pool(mapping), store)
        return failed

    def delete_multi(self, keys: Iterable[str], *args: Any) -> bool:
        keys = list(keys)
        self._invalidate_former_owners(keys)
        outcomes: list[bool] = []

        def delete(client: Any, node_keys: list[str]) -> None:
            outcomes.append(bool(client.delete_multi(node_keys, *args)))

        self._on_every_node(self.by_pool(keys), delete)
        return all(outcomes)

    def flush_all(self, *args: Any) -> None:
        self._on_every_node(
            {pool: [] for pool in self._pools}, lambda client, _: client.flush_all(*args)
        )

    def _on_every_node(
        self, groups: Mapping[NodePool, list[str]], call: Callable[[Any, list[str]], None]
    ) -> None:
        """
        ``call(client, keys)`` for each node's keys. A node that fails does not stop the others
        (the keys of a write not tried would keep their old values); the first error is raised
        once every node was tried.
        """
        first_error: BaseException | None = None
        for pool, node_keys in groups.items():
            try:
                with pool.client(self._is_node_failure) as client:
                    call(client, node_keys)
            except Exception as error:
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    # Keys whose owner changed

    def former_owners(self, keys: Iterable[str]) -> dict[NodePool, list[str]]:
        """
        The keys about to be written or deleted whose owner changed within the invalidation
        window, by the pool of their former owner: their old copies must be deleted there.
        """
        if self._former_owners is None:
            return {}
        if time.monotonic() >= self._invalidate_until:
            self._former_owners = self._former_placement = None
            return {}
        assert self._former_placement is not None
        stale: dict[NodePool, list[str]] = {}
        for key in keys:
            former = self._former_owners[self._former_placement.node_index(key)]
            if former is not None and former is not self.pool_for(key):
                stale.setdefault(former, []).append(key)
        return stale

    def _invalidate_former_owners(self, keys: Iterable[str]) -> None:
        for pool, node_keys in self.former_owners(keys).items():
            try:
                with pool.client(self._is_node_failure) as client:
                    client.delete_multi(node_keys)
            except Exception as error:
                log_invalidation_failure(pool, len(node_keys), error)


def log_invalidation_failure(pool: NodePool, count: int, error: Exception) -> None:
    """A moved key's old copy could not be deleted: worth a warning, not a failed write."""
    logger.warning(
        "Could not delete %d moved keys on their former node %s: %s",
        count,
        pool.node.hostname or pool.node.ip,
        error,
    )


class ClusterClients:
    """
    The ``ClusterClient`` of the current node list of one cache setting, for the whole process.

    A new node list gets a new ``ClusterClient``, which keeps the pools of the nodes that stay
    (same hostname, IP and port: their connections stay open, as AWS's own clients do) and
    retires the others: their idle clients are closed at once, borrowed ones when given back.
    """

    def __init__(
        self,
        make_client: Callable[[ClusterNode], Any],
        close_client: Callable[[Any], None],
        placement_for: Callable[[ClusterConfig], Placement],
        is_node_failure: Callable[[BaseException], bool],
        pool_size: int,
        invalidation_window: float | None,
    ) -> None:
        self._make_client = make_client
        self._close_client = close_client
        self._placement_for = placement_for
        self._is_node_failure = is_node_failure
        self._pool_size = pool_size
        self._invalidation_window = invalidation_window
        self._current: ClusterClient | None = None
        self._pools: dict[ClusterNode, NodePool] = {}
        self._lock = threading.Lock()

    def for_config(self, config: ClusterConfig) -> ClusterClient:
        current = self._current
        if current is not None and current.config is config:
            return current
        with self._lock:
            current = self._current
            if current is None or current.config is not config:
                current = self._current = self._switch(current, config)
            return current

    def _switch(self, previous: ClusterClient | None, config: ClusterConfig) -> ClusterClient:
        pools = {node: self._pools.get(node) or self._new_pool(node) for node in config.nodes}
        for node, pool in self._pools.items():
            if node not in pools:
                pool.retire()
        self._pools = pools
        if previous is not None and previous.config.nodes == config.nodes:
            previous = None  # The same list as a new object (after a fork): nothing moved.
        return ClusterClient(
            config,
            [pools[node] for node in config.nodes],
            self._placement_for(config),
            self._is_node_failure,
            previous,
            self._invalidation_window,
        )

    def _new_pool(self, node: ClusterNode) -> NodePool:
        return NodePool(node, self._make_client, self._close_client, self._pool_size)


_registry: weakref.WeakKeyDictionary[object, dict[Hashable, ClusterClients]] = (
    weakref.WeakKeyDictionary()
)
_registry_lock = threading.Lock()


def cluster_clients(
    topology: object, settings: Hashable, create: Callable[[], ClusterClients]
) -> ClusterClients:
    """
    The process's one ``ClusterClients`` for these settings over this topology: every backend
    instance of the same cache shares it. A forgotten topology takes its clients with it.
    """
    with _registry_lock:
        per_topology = _registry.setdefault(topology, {})
        if settings not in per_topology:
            per_topology[settings] = create()
        return per_topology[settings]
