"""
Django's async cache methods, run on the event loop instead of a thread.

``BaseCache.aget`` and its siblings call the sync method through ``sync_to_async``: a thread
hop per call, several times the cost of the call itself. ``AsyncCacheMixin`` implements each
of them the way the sync method of Django's memcached backends behaves (same key rules,
timeout conversion, return values, ``ValueError`` from ``aincr``, error policy), over
``async_client.AsyncClusterClient``. ``adecr``, ``ahas_key``, ``aget_or_set`` and the
version helpers are Django's own: they call the methods here, so they never hop either.
Server errors follow the sync path's policy (``backend._miss_on_server_error``).

A backend supplies its client library's rules through ``_make_async_adapter`` (see
``async_client.LibraryAdapter``).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

from django.core.cache.backends.base import DEFAULT_TIMEOUT

from .async_client import MISSING, AsyncClusterClient, LibraryAdapter
from .backend import (
    _constant,
    _every_key,
    _key_not_found,
    _miss_on_server_error,
    made_key,
)
from .options import BackendOptions
from .routing import ClusterClient, ClusterClients

__all__ = ["AsyncCacheMixin"]

_async_clients: weakref.WeakKeyDictionary[ClusterClients, AsyncClusterClient] = (
    weakref.WeakKeyDictionary()
)
_async_clients_lock = threading.Lock()


class AsyncCacheMixin:
    """
    The async half of Django's cache API for a ``ClusterCacheMixin`` backend, on the loop.
    Every backend instance of one cache shares one ``AsyncClusterClient``, as it shares the
    sync path's ``ClusterClients``.
    """

    def _make_async_adapter(self) -> LibraryAdapter:
        """The client library's key, value, timeout and error rules for the event loop."""
        raise NotImplementedError

    if TYPE_CHECKING:  # Provided by ClusterCacheMixin and Django's BaseCache.
        _cache: ClusterClient
        _clients: ClusterClients
        backend_options: BackendOptions
        server_errors: ClassVar[tuple[type[Exception], ...]]

        def _is_node_failure(self, error: BaseException) -> bool: ...
        def _absorb(self, error: Exception, operation: str) -> bool: ...
        def make_and_validate_key(self, key: Any, version: Any = None) -> str: ...
        def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> int: ...

    @functools.cached_property
    def _async_client(self) -> AsyncClusterClient:
        clients = self._clients
        with _async_clients_lock:
            if clients not in _async_clients:
                _async_clients[clients] = AsyncClusterClient(
                    self._make_async_adapter(),
                    self.backend_options.tls,
                    self.backend_options.pool_size,
                    self._is_node_failure,
                )
            return _async_clients[clients]

    async def aget(self, key: Any, default: Any = None, version: Any = None) -> Any:
        # ``_miss_on_server_error`` written out (a miss: ``default``): one coroutine per call
        # instead of two, on the call made most; the key made as ``get`` makes it.
        made = made_key(self, key, version) or self.make_and_validate_key(key, version)
        try:
            value = await self._async_client.get(self._cache, made)
        except self.server_errors as error:
            if not self._absorb(error, "aget"):
                raise
            return default
        return default if value is MISSING else value

    @_miss_on_server_error(_constant({}))
    async def aget_many(self, keys: Any, version: Any = None) -> dict[Any, Any]:
        key_map = {self.make_and_validate_key(key, version=version): key for key in keys}
        found = await self._async_client.get_many(self._cache, key_map)
        return {key_map[key]: value for key, value in found.items()}

    @_miss_on_server_error(_constant(False))
    async def aset(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> None:
        key = self.make_and_validate_key(key, version=version)
        cluster, client = self._cache, self._async_client
        exptime = self.get_backend_timeout(timeout)
        not_stored, failure = await client.store(cluster, b"set", {key: value}, exptime)
        if failure is not None:
            raise failure
        if not_stored:
            # As the sync path: a value memcached refused must not leave the old one behind.
            await client.delete(cluster, [key])

    @_miss_on_server_error(_constant(False))
    async def aadd(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> bool:
        key = self.make_and_validate_key(key, version=version)
        exptime = self.get_backend_timeout(timeout)
        not_stored, failure = await self._async_client.store(
            self._cache, b"add", {key: value}, exptime
        )
        if failure is not None:
            raise failure
        return not not_stored

    @_miss_on_server_error(_constant(False))
    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        exptime = self.get_backend_timeout(timeout)
        return await self._async_client.touch(self._cache, key, exptime)

    @_miss_on_server_error(_constant(False))
    async def adelete(self, key: Any, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        (deleted,) = await self._async_client.delete(self._cache, [key])
        return deleted

    @_miss_on_server_error(_key_not_found)
    async def aincr(self, key: Any, delta: int = 1, version: Any = None) -> int:
        key = self.make_and_validate_key(key, version=version)
        value = await self._async_client.counter(self._cache, key, delta)
        if value is None:
            raise ValueError(f"Key '{key}' not found")
        return value

    @_miss_on_server_error(_every_key)
    async def aset_many(
        self, data: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> list[Any]:
        original_keys = {self.make_and_validate_key(key, version=version): key for key in data}
        safe_data = {safe_key: data[key] for safe_key, key in original_keys.items()}
        exptime = self.get_backend_timeout(timeout)
        not_stored, failure = await self._async_client.store(
            self._cache, b"set", safe_data, exptime
        )
        # A failure the policy absorbs (IGNORE_EXCEPTIONS) still reports exactly the keys
        # not stored (see ``AsyncClusterClient.store``), not every key of the call.
        if failure is not None and not self._absorb(failure, "aset_many"):
            raise failure
        return [original_keys[key] for key in not_stored]

    @_miss_on_server_error(_constant(None))
    async def adelete_many(self, keys: Any, version: Any = None) -> None:
        keys = [self.make_and_validate_key(key, version=version) for key in keys]
        await self._async_client.delete(self._cache, keys)

    @_miss_on_server_error(_constant(None))
    async def aclear(self) -> None:
        await self._async_client.flush_all(self._cache)

    async def aclose(self, **kwargs: Any) -> None:
        """As ``close``: connections outlive requests; the loop's shutdown closes them."""
