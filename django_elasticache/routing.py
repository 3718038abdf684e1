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
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from .cluster_utils import ClusterConfig, ClusterNode
from .pool import NodePool
from .protocol import COMPILED

__all__ = [
    "ClusterClient",
    "ClusterClients",
    "Placement",
    "PooledNodeClient",
    "UnsupportedCall",
    "cluster_clients",
    "start_call",
]

SERVERLESS_MAX_REQUEST = 16 * 1024
"""Bytes of one multi-key request that ElastiCache Serverless for memcached accepts."""

logger = logging.getLogger("django_elasticache")


class Placement(Protocol):
    """Which node of a node list holds a key: an index into ``ClusterConfig.nodes``."""

    def node_index(self, key: str) -> int: ...


NodeKey = tuple[str, int]


class UnsupportedCall(NotImplementedError):
    """
    A call of the library's own client that a client over discovered nodes cannot honour:
    the nodes, their placement and their options are the backend's, set from OPTIONS.
    """


def node_identity(node: ClusterNode) -> NodeKey:
    """A node is its hostname and port; its IP changes when ElastiCache replaces it."""
    return (node.hostname or node.ip, node.port)


def start_call(method: str, client: Any, *args: Any, **kwargs: Any) -> Callable[[], Any]:
    """
    A node's ``method(*args, **kwargs)``, sent now if its client can split it:
    ``start_<method>`` sends the requests and returns the function that reads the replies,
    where the client's ``two_step_calls`` names the method as the one that form replaces.
    Other clients run the whole call when its result is asked for.
    """
    client_class = client.__class__
    start = _two_step_form(client_class, method, getattr(client_class, method, None))
    if start is None:
        return functools.partial(getattr(client, method), *args, **kwargs)
    result: Callable[[], Any] = start(client, *args, **kwargs)
    return result


@functools.cache
def _two_step_form(client_class: type, method: str, whole: Any) -> Callable[..., Any] | None:
    """
    ``client_class``'s ``start_<method>``, unless it has none or ``whole``, its ``method``
    now, is not the one that form replaces (a subclass replaced it, or a test's mock): the
    method itself then does the call. Looked up once per class, method and ``whole``.
    """
    start = getattr(client_class, f"start_{method}", None)
    if start is None or whole is not getattr(client_class, "two_step_calls", {}).get(method):
        return None
    return start


def group_by_node_in_python(
    keys: list[str], node_index: Callable[[str], int], count: int
) -> list[list[str]]:
    """
    The keys in ``count`` lists, each key in the list of its node's index, in order.
    ``group_by_node`` is this function, or where it is built, its compiled twin.
    """
    groups: list[list[str]] = [[] for _ in range(count)]
    for key in keys:
        groups[node_index(key)].append(key)
    return groups


group_by_node: Callable[[list[str], Callable[[str], int], int], list[list[str]]] = (
    COMPILED.group_by_node if COMPILED is not None else group_by_node_in_python
)


def pooled_call_in_python(
    pools: Sequence[NodePool],
    node_index: Callable[[str], int] | None,
    is_node_failure: Callable[[BaseException], bool],
    method: str,
    key: str,
    *args: Any,
) -> Any:
    """
    ``method(key, *args)`` on a client of the key's node (``pools[node_index(key)]``, or
    ``pools[0]`` when ``node_index`` is None), borrowed from its pool and given back.
    """
    pool = pools[0] if node_index is None else pools[node_index(key)]
    client = None
    try:
        # Borrowed and given back inside the try: an interruption just after borrow or
        # at give_back's first bytecode still hands the client back.
        client = pool.borrow()
        result = getattr(client, method)(key, *args)
        pool.give_back(client)
    except BaseException as error:
        if client is not None:
            pool.give_back_after(client, error, is_node_failure)
        raise
    return result


pooled_call: Callable[..., Any] = (
    COMPILED.pooled_call if COMPILED is not None else pooled_call_in_python
)
"""
A single-key call; the compiled one does the pool's common case itself, so that no
interruption can land between the borrow, the call and the give-back.
"""

borrow: Callable[[NodePool], Any] = COMPILED.borrow if COMPILED is not None else NodePool.borrow
give_back: Callable[[NodePool, Any], None] = (
    COMPILED.give_back if COMPILED is not None else NodePool.give_back
)
"""
``pool.borrow()`` and ``pool.give_back(client)`` for the calls over every node; the compiled
ones do the pool's common case as ``pooled_call`` does, the rest in the pool's methods.
"""


_start_get_multi: Callable[[Any, list[str]], Callable[[], dict[str, Any]]] = functools.partial(
    start_call, "get_multi"
)


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
        *,
        server_errors: tuple[type[Exception], ...],
    ) -> None:
        self.config = config
        self.server_errors = server_errors
        """What the library raises when a node fails or refuses: nothing else is absorbed."""
        self._pools = list(pools)
        self._placement = placement
        self._is_node_failure = is_node_failure
        self._single = self._pools[0] if len(self._pools) == 1 else None
        self.call: Callable[..., Any] = functools.partial(
            pooled_call,
            self._pools,
            None if self._single is not None else placement.node_index,
            is_node_failure,
        )
        """``call(method, key, *args)``: ``method(key, *args)`` on a client of the key's node."""
        self._former_owners: list[NodePool | None] | None = None
        self._former_placement: Placement | None = None
        self._invalidate_until = 0.0
        if previous is not None and invalidation_window != 0:
            self._remember_former_owners(previous, invalidation_window)
        # Former owners are known from the start or never: without them a write is a call.
        self.write: Callable[..., Any] = (
            self.call if self._former_owners is None else self._invalidating_write
        )
        """
        ``write(method, key, *args)``: ``call`` for a single-key write or delete, which
        first deletes the key on its former owner while keys may have moved (see above).
        """
        self.store: Callable[[str, Any, int], Any] = functools.partial(self.write, "set")
        """
        ``store(key, value, exptime)``: the library's ``set`` as the backend's ``set`` calls
        it, without a frame of Python between it and the compiled call.
        """

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

    def _invalidating_write(self, method: str, key: str, *args: Any) -> Any:
        self._invalidate_former_owners((key,))
        return self.call(method, key, *args)

    def get(self, key: str, *args: Any) -> Any:
        return self.call("get", key, *args)

    def touch(self, key: str, *args: Any) -> Any:
        return self.call("touch", key, *args)

    def incr(self, key: str, *args: Any) -> Any:
        return self.call("incr", key, *args)

    def decr(self, key: str, *args: Any) -> Any:
        return self.call("decr", key, *args)

    def set(self, key: str, *args: Any) -> Any:
        return self.write("set", key, *args)

    def add(self, key: str, *args: Any) -> Any:
        return self.write("add", key, *args)

    def delete(self, key: str, *args: Any) -> Any:
        return self.write("delete", key, *args)

    # Multi-key calls

    def by_pool(self, keys: Iterable[str]) -> dict[NodePool, list[str]]:
        """The keys grouped by the pool of their node (the async path groups alike)."""
        if self._single is not None:
            return {self._single: list(keys)}
        groups = group_by_node(
            keys if type(keys) is list else list(keys),
            self._placement.node_index,
            len(self._pools),
        )
        return {pool: group for pool, group in zip(self._pools, groups, strict=True) if group}

    def get_multi(self, keys: Iterable[str], *args: Any) -> dict[str, Any]:
        """
        The values found on every node. Should a node fail, the values read from the others
        are not returned: with IGNORE_EXCEPTIONS the whole ``get_many`` is a miss, as on the
        event-loop path.
        """
        groups = self.by_pool(keys)
        start: Callable[[Any, list[str]], Callable[[], dict[str, Any]]]
        if args or self.config.serverless:
            start = functools.partial(self._get_in_batches, args=args)
        else:
            start = _start_get_multi
        found: dict[str, Any] = {}
        for node_found in self._on_every_node(groups, start):
            found.update(node_found)
        return found

    def _get_in_batches(
        self, client: Any, node_keys: list[str], args: tuple[Any, ...]
    ) -> Callable[[], dict[str, Any]]:
        """A node's ``get_multi`` in ``get_batches``, one after another, when read."""

        def read() -> dict[str, Any]:
            found: dict[str, Any] = {}
            for batch in self.get_batches(node_keys):
                found.update(client.get_multi(batch, *args))
            return found

        return read

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
        return self.store_multi("set_multi", mapping, *args, **kwargs)

    def store_multi(
        self, method: str, mapping: Mapping[str, Any], *args: Any, **kwargs: Any
    ) -> list[str]:
        """
        A multi-key storage call (``set_multi``, pylibmc's ``add_multi``), split by node:
        the keys the nodes did not store.
        """
        self._invalidate_former_owners(mapping)

        def store(client: Any, node_keys: list[str]) -> Callable[[], list[str]]:
            part = {key: mapping[key] for key in node_keys}
            return start_call(method, client, part, *args, **kwargs)

        results = self._on_every_node(self.by_pool(mapping), store)
        return [key for node_failed in results for key in node_failed]

    def delete_multi(self, keys: Iterable[str], *args: Any) -> bool:
        keys = list(keys)
        self._invalidate_former_owners(keys)
        results = self._on_every_node(
            self.by_pool(keys),
            lambda client, node_keys: start_call("delete_multi", client, node_keys, *args),
        )
        return all(bool(deleted) for deleted in results)

    def flush_all(self, *args: Any) -> None:
        self.on_every_node(lambda client: client.flush_all(*args))

    def _on_every_node(
        self,
        groups: Mapping[NodePool, list[str]],
        start: Callable[[Any, list[str]], Callable[[], Any]],
    ) -> list[Any]:
        """
        One call for each node's keys, over every node at once, as libmemcached's
        multi-server calls do: ``start(client, keys)`` sends the node's requests where its
        client can split the call (``start_call``) and returns the function that reads the
        replies. Every node's requests are sent before any reply is read, so the nodes
        answer in parallel and the call waits for one round trip, not one per node. Each
        node's result is returned, in the order of ``groups``.

        A node that fails does not stop the others (the keys of a write not tried would
        keep their old values): every other node's reply is still read, so its connection
        stays in step and is pooled again, and the first error is raised once every node was
        tried. An interruption that is not an ``Exception`` is raised at once, and every
        client whose reply was not read is closed (see ``pool``).
        """
        first_error: Exception | None = None
        started: list[tuple[NodePool, Any, Callable[[], Any]]] = []
        results: list[Any] = []
        try:
            for pool, node_keys in groups.items():
                try:
                    client = borrow(pool)
                except Exception as error:
                    first_error = first_error or error
                    continue
                try:
                    started.append((pool, client, start(client, node_keys)))
                except BaseException as error:
                    # Perhaps raised after the requests went out: never pooled again.
                    pool.discard_after(client, error, self._is_node_failure)
                    if not isinstance(error, Exception):
                        raise
                    first_error = first_error or error
            while started:
                # Taken off the list first: a client is handed back once, whatever interrupts.
                pool, client, read_replies = started.pop(0)
                try:
                    results.append(read_replies())
                except BaseException as error:
                    pool.give_back_after(client, error, self._is_node_failure)
                    if not isinstance(error, Exception):
                        raise
                    first_error = first_error or error
                else:
                    give_back(pool, client)
        finally:
            for pool, client, _ in started:
                pool.discard(client)  # Interrupted: its replies are still on the wire.
        if first_error is not None:
            raise first_error
        return results

    # The rest of the library clients' surface (each backend's subclass shapes it)

    def on_every_node(self, call: Callable[[Any], Any]) -> list[tuple[NodePool, Any]]:
        """
        ``call(client)`` on a client of every node, in node order: each node's pool and what
        its call returned. As ``flush_all``, every node is tried before the first error is
        raised.
        """
        results = self._on_every_node(
            {pool: [] for pool in self._pools}, lambda client, _: functools.partial(call, client)
        )
        # _on_every_node returned, so every node answered, in the order of self._pools.
        return list(zip(self._pools, results, strict=True))

    def disconnect_all(self) -> None:
        """
        Close every node's idle connections, as the libraries' ``disconnect_all`` closes
        theirs; the next calls connect again. Connections lent to other threads stay open.
        """
        for pool in self._pools:
            pool.close_idle()

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
        if self._former_owners is None:
            return  # No node list change to follow: the common case, on every write.
        for pool, node_keys in self.former_owners(keys).items():
            try:
                with pool.client(self._is_node_failure) as client:
                    client.delete_multi(node_keys)
            except self.server_errors as error:
                # Only the node's failure: anything else (an interruption raised as an
                # Exception, a request timeout) ends the write, which must not pass for done.
                log_invalidation_failure(pool, len(node_keys), error)


class PooledNodeClient:
    """
    One node's pool seen as one client of the library, for code that reaches for a
    library's per-server clients (pymemcache's ``HashClient.clients``). A method call
    borrows a client of the node for that call alone; any other attribute is read off a
    borrowed client (every client of a node is built alike).
    """

    def __init__(self, pool: NodePool, is_node_failure: Callable[[BaseException], bool]) -> None:
        self._pool = pool
        self._is_node_failure = is_node_failure

    def __repr__(self) -> str:
        return f"<PooledNodeClient of {self._pool.node}>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # Copy, pickle...: not the node client's business.
        with self._pool.client(self._is_node_failure) as client:
            attribute = getattr(client, name)
        if inspect.ismethod(attribute):
            return functools.partial(self._call_method, name)
        return attribute

    def _call_method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        with self._pool.client(self._is_node_failure) as client:
            return getattr(client, name)(*args, **kwargs)


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
    ``client_class`` builds each ``ClusterClient``: the backend's subclass offers the surface
    of its library's own client.
    """

    def __init__(
        self,
        make_client: Callable[[ClusterNode], Any],
        close_client: Callable[[Any], None],
        placement_for: Callable[[ClusterConfig], Placement],
        is_node_failure: Callable[[BaseException], bool],
        pool_size: int,
        invalidation_window: float | None,
        server_errors: tuple[type[Exception], ...],
        client_class: Callable[..., ClusterClient] = ClusterClient,
    ) -> None:
        self._client_class = client_class
        self._server_errors = server_errors
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
        return self._client_class(
            config,
            [pools[node] for node in config.nodes],
            self._placement_for(config),
            self._is_node_failure,
            previous,
            self._invalidation_window,
            server_errors=self._server_errors,
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
