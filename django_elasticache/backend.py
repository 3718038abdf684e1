"""
What every backend of this package adds to a Django memcached backend, whatever client
library it drives: the servers come from the cluster's topology, every call runs on a client
of its key's node borrowed from the process's pools (``routing``, ``pool``), and server
errors bring re-discovery forward and, with IGNORE_EXCEPTIONS, become cache misses.

A concrete backend mixes ``ClusterCacheMixin`` into the Django backend for its library and
names that library's errors; see ``memcached.ElastiCache``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
    MEMCACHE_MAX_KEY_LENGTH,
    BaseCache,
    default_key_func,
)
from django.core.cache.backends.memcached import BaseMemcachedCache

from . import forks
from .cluster_utils import ClusterConfig, ClusterDiscoveryError, ClusterNode
from .options import BackendRules, read_settings
from .pool import NodeError
from .protocol import COMPILED
from .routing import ClusterClient, ClusterClients, Placement, cluster_clients
from .topology import topology_for

__all__ = ["ClusterCacheMixin"]

logger = logging.getLogger("django_elasticache")

MEMCACHE_MAX_RELATIVE_EXPIRY = 60 * 60 * 24 * 30
"""Memcached reads a longer expiry as a point in time: Django's ``get_backend_timeout``."""

ERROR_LOG_INTERVAL = 60.0
"""Seconds between two log lines for errors from the same source under IGNORE_EXCEPTIONS."""

Method = TypeVar("Method", bound=Callable[..., Any])


class _ErrorLog:
    """At most one log line per source per interval, so a dead node cannot flood the logs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start empty, with a new lock (after a fork, the parent's may be held forever)."""
        self._lock = threading.Lock()
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, source: str, operation: str, error: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_logged.get(source, -ERROR_LOG_INTERVAL) < ERROR_LOG_INTERVAL:
                self._suppressed[source] = self._suppressed.get(source, 0) + 1
                return
            self._last_logged[source] = now
            suppressed = self._suppressed.pop(source, 0)
        logger.warning(
            "Cache %s failed, treated as a miss (IGNORE_EXCEPTIONS): %s "
            "(%d more errors from %s since the last report)",
            operation,
            error,
            suppressed,
            source,
        )


_error_log = _ErrorLog()
forks.after_fork_in_child(_error_log.reset)


prefixed_keys: Callable[[str, list[Any]], dict[str, Any] | None] | None = (
    COMPILED.prefixed_keys if COMPILED is not None else None
)
"""
``{prefix + key: key}`` in one compiled pass, or None unless every key is an ASCII str
whose made key is 1 to 250 characters from ``!`` to ``~`` (one Django accepts as it is).
Without the compiled loops, ``_make_and_validate_keys`` does the work.
"""


def made_key_in_python(cache: Any, key: Any, version: Any) -> str | None:
    """
    ``cache``'s key for ``key``, as Django's default key function makes it
    (``f"{key_prefix}:{version}:{key}"``, the cache's own ``version`` if ``version`` is None),
    where the cache makes and checks keys the default way (``_default_key_making``), for a
    str prefix and key and an int or str version; None unless it is 1 to 250 characters from
    ``!`` to ``~`` (a key Django's own checks accept as it is).
    """
    if not cache._default_key_making:
        return None
    key_prefix = cache.key_prefix
    if version is None:
        version = cache.version
    if type(key_prefix) is not str or type(key) is not str or type(version) not in (int, str):
        return None
    made = f"{key_prefix}:{version}:{key}"
    plain = made.isascii() and made.isprintable() and " " not in made
    return made if plain and len(made) <= MEMCACHE_MAX_KEY_LENGTH else None


made_key: Callable[[Any, Any, Any], str | None] = (
    COMPILED.made_key if COMPILED is not None else made_key_in_python
)
"""
``made_key(cache, key, version) or cache.make_and_validate_key(key, version)`` is what
``make_and_validate_key`` returns; the single-key calls made most (``get``, ``set``, ``aget``)
write it so, which spares them the frame of that method (1-2% of a ``get``).
"""


def _miss_on_server_error(miss: Callable[..., Any]) -> Callable[[Method], Method]:
    """
    Let a server or connection error in the wrapped method bring re-discovery forward and,
    with IGNORE_EXCEPTIONS, return ``miss(*arguments)`` instead of raising. Errors that are
    the caller's fault (a bad key, a value too large) always raise. Coroutine methods (the
    async cache API) get the same policy, awaited.
    """

    def decorate(method: Method) -> Method:
        def answer(self: ClusterCacheMixin, error: Exception, args: Any, kwargs: Any) -> Any:
            if not self._absorb(error, method.__name__):
                raise error
            return miss(*args, **kwargs)

        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def guarded_coroutine(self: ClusterCacheMixin, *args: Any, **kwargs: Any) -> Any:
                try:
                    return await method(self, *args, **kwargs)
                except self.server_errors as error:
                    return answer(self, error, args, kwargs)

            return guarded_coroutine  # type: ignore[return-value]

        @functools.wraps(method)
        def guarded(self: ClusterCacheMixin, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except self.server_errors as error:
                return answer(self, error, args, kwargs)

        return guarded  # type: ignore[return-value]

    return decorate


def _every_key(data: Any, *args: Any, **kwargs: Any) -> list[Any]:
    return list(data)


def _key_not_found(key: Any, *args: Any, **kwargs: Any) -> Any:
    raise ValueError(f"Key '{key}' not found")


def _constant(value: Any) -> Callable[..., Any]:
    return lambda *args, **kwargs: value


class ClusterCacheMixin:
    """
    Cluster discovery, client replacement and error policy for a Django memcached backend.

    Subclasses set ``option_rules`` (what the backend refuses besides the shared rules),
    ``server_errors`` (what the client library raises when a server fails),
    ``caller_errors`` (what it raises for the caller's mistakes, never swallowed) and
    ``connection_errors`` (the server errors that mean the node could not be reached), and
    implement ``_make_node_client``, ``_close_node_client`` and ``_placement``.
    """

    server_errors: ClassVar[tuple[type[Exception], ...]] = (
        ClusterDiscoveryError,
        NodeError,
    )
    caller_errors: ClassVar[tuple[type[Exception], ...]] = ()
    connection_errors: ClassVar[tuple[type[Exception], ...]] = ()
    option_rules: ClassVar[BackendRules]

    # Set by Django's BaseMemcachedCache and BaseCache, which the mixin is combined with.
    _options: dict[str, Any]

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        settings = read_settings(server, params.get("OPTIONS"), self.option_rules)
        self.backend_options = settings.backend
        super().__init__(server, {**params, "OPTIONS": settings.client})  # type: ignore[call-arg]
        self._topology = topology_for(settings.endpoint, settings.backend.discovery_settings)
        self._cluster_client: ClusterClient | None = None
        cls: Any = type(self)
        self._default_key_making = (
            cls.make_key is BaseCache.make_key
            and cls.validate_key is ClusterCacheMixin.validate_key
            and cls.make_and_validate_key is ClusterCacheMixin.make_and_validate_key
            and self.key_func is default_key_func  # type: ignore[attr-defined]
        )
        """
        Whether keys are made and checked by Django's key function and by this mixin's and
        Django's own methods: then the common keys are made and checked at once
        (``made_key``, ``prefixed_keys``).
        """

    @property
    def default_timeout(self) -> float | None:
        return self._default_timeout

    @default_timeout.setter
    def default_timeout(self, timeout: float | None) -> None:
        """
        Django's ``BaseCache`` sets it, and so may a user. The expiry that ``set`` sends for
        it is worked out here, once, unless Django's ``get_backend_timeout`` would give
        another one later (a timeout over 30 days becomes a point in time) or is not the one
        in use: the call made most skips that function.
        """
        self._default_timeout = timeout
        self._default_exptime: int | None = None
        fixed = timeout is None or (
            type(timeout) in (int, float) and timeout <= MEMCACHE_MAX_RELATIVE_EXPIRY
        )
        if fixed and type(self).get_backend_timeout is BaseMemcachedCache.get_backend_timeout:  # type: ignore[attr-defined]
            self._default_exptime = self.get_backend_timeout(DEFAULT_TIMEOUT)  # type: ignore[attr-defined]

    @functools.cached_property
    def _clients(self) -> ClusterClients:
        """
        The process's clients for this cache: every backend instance with the same settings
        (one per thread, or one shared by many) borrows from the same pools.
        """
        settings = (type(self), repr(sorted(self._options.items())), self.default_timeout)
        return cluster_clients(self._topology, settings, self._new_cluster_clients)

    def _new_cluster_clients(self) -> ClusterClients:
        return ClusterClients(
            make_client=self._make_node_client,
            close_client=self._close_node_client,
            placement_for=self._placement,
            is_node_failure=self._is_node_failure,
            pool_size=self.backend_options.pool_size,
            invalidation_window=self.default_timeout,
            server_errors=self.server_errors,
            client_class=self._cluster_client_class(),
        )

    def _cluster_client_class(self) -> Callable[..., ClusterClient]:
        """
        What builds ``_cache`` for each node list: a ``ClusterClient`` offering the surface
        of the library's own client, since code in the wild reaches into ``cache._cache``.
        """
        return ClusterClient

    def _make_node_client(self, node: ClusterNode) -> Any:
        """A client of the library connected to this one node."""
        raise NotImplementedError

    def _close_node_client(self, client: Any) -> None:
        """Close a client's connection; it is not used again."""
        raise NotImplementedError

    def _placement(self, config: ClusterConfig) -> Placement:
        """Which node holds a key, as the library's own hashing over node hostnames."""
        raise NotImplementedError

    def _is_caller_error(self, error: BaseException) -> bool:
        """
        Whether the request itself was refused (a value too large, a non-numeric incr):
        raised as it is, never a miss, and never a reason to ask for the node list again.
        """
        return isinstance(error, self.caller_errors)

    def _is_node_failure(self, error: BaseException) -> bool:
        """Whether an error means the node could not be reached (not a refused request)."""
        return isinstance(error, self.connection_errors)

    @property
    def client_servers(self) -> list[str]:
        return list(self._topology.current().addresses)

    @property
    def _cache(self) -> ClusterClient:
        """
        The clients of the current node list. Checking for a new list costs one identity test.
        """
        config = self._topology.current()
        client = self._cluster_client
        if client is None or client.config is not config:
            client = self._cluster_client = self._clients.for_config(config)
        return client

    def close(self, **kwargs: Any) -> None:
        """
        Django closes caches at the end of every request. Every call has given its client back
        to the pool already, and connections are meant to outlive requests: nothing to do.
        """

    def _absorb(self, error: Exception, operation: str) -> bool:
        """
        React to a server error: ask the endpoint again soon (the node may have been
        replaced), and tell whether IGNORE_EXCEPTIONS says to answer with a miss.
        """
        if self._is_caller_error(error):
            return False
        self._topology.refresh_soon()
        if not self.backend_options.ignore_exceptions:
            return False
        _error_log.log(self._error_source(error), operation, error)
        return True

    def _error_source(self, error: Exception) -> str:
        """Where an error came from, for rate-limiting its log lines: its node if known."""
        if isinstance(error, NodeError):
            return error.node_name
        return self._topology.name

    def validate_key(self, key: str) -> None:
        """
        Django's memcached key rules, decided for the common key without a loop in Python.
        A printable key has no control characters or DEL; with no space either, Django
        would accept it. Anything else gets Django's own check and message.
        """
        if len(key) <= MEMCACHE_MAX_KEY_LENGTH and key.isprintable() and " " not in key:
            return
        super().validate_key(key)  # type: ignore[misc]

    def make_and_validate_key(self, key: Any, version: Any = None) -> str:
        """
        Django's, for every single-key call, with the common case made and checked at once
        (``made_key``: Django's key function, a str key, the made key accepted as it is by
        ``validate_key``): a call takes one function call here instead of four. A subclass
        that makes or checks keys its own way gets Django's path.
        """
        return made_key(self, key, version) or super().make_and_validate_key(key, version)  # type: ignore[misc]

    def _make_and_validate_keys(self, keys: list[Any], version: Any) -> list[str]:
        """
        ``make_and_validate_key`` for many keys at once, with the same keys and the same
        error. Where keys are made the default way (``_default_key_making``), every key gets
        one prefix and the keys are checked together: their concatenation is printable
        without spaces and none is too long. Should the check fail, each key is checked in
        order as Django does, so the first bad key raises Django's message.
        """
        if not self._default_key_making:
            return [self.make_and_validate_key(key, version) for key in keys]
        prefix = f"{self.key_prefix}:{self.version if version is None else version}:"  # type: ignore[attr-defined]
        made = [prefix + key if type(key) is str else f"{prefix}{key}" for key in keys]
        joined = "".join(made)
        if not (
            joined.isprintable()
            and " " not in joined
            and (
                len(joined) <= MEMCACHE_MAX_KEY_LENGTH
                or max(map(len, made)) <= MEMCACHE_MAX_KEY_LENGTH
            )
        ):
            for key in made:
                self.validate_key(key)
        return made

    def get(self, key: Any, default: Any = None, version: Any = None) -> Any:
        """
        Django's ``BaseMemcachedCache.get`` with ``_miss_on_server_error``'s policy written
        in: the most frequent call of all runs in one frame of its own instead of three. So
        do ``set`` and ``get_many``, the other calls every page makes. The key is made as
        ``make_and_validate_key`` makes it, without its frame (see ``made_key``).
        """
        made = made_key(self, key, version) or self.make_and_validate_key(key, version)
        try:
            return self._cache.call("get", made, default)
        except self.server_errors as error:
            if not self._absorb(error, "get"):
                raise
            return default

    def _originals(self, keys: list[Any], version: Any) -> dict[str, Any]:
        """
        ``{made key: key}``, the keys made and checked as ``_make_and_validate_keys`` makes
        them. Where the compiled loops are built, the common case (Django's key function,
        str keys whose made keys are plain ASCII) is made and checked in one pass.
        """
        if prefixed_keys is not None and self._default_key_making:
            prefix = f"{self.key_prefix}:{self.version if version is None else version}:"  # type: ignore[attr-defined]
            originals = prefixed_keys(prefix, keys)
            if originals is not None:
                return originals
        return dict(zip(self._make_and_validate_keys(keys, version), keys, strict=True))

    def get_many(self, keys: Any, version: Any = None) -> dict[Any, Any]:
        """Django's, with the policy written in as in ``get``."""
        keys = list(keys)
        originals = self._originals(keys, version)
        try:
            found = self._cache.get_multi(originals)
        except self.server_errors as error:
            if not self._absorb(error, "get_many"):
                raise
            return {}
        return {originals[key]: value for key, value in found.items()}

    def set(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> Any:
        """Django's ``BaseMemcachedCache.set``, the policy and the key written in as in ``get``."""
        key = made_key(self, key, version) or self.make_and_validate_key(key, version)
        exptime = self._default_exptime if timeout is DEFAULT_TIMEOUT else None
        if exptime is None:
            exptime = self.get_backend_timeout(timeout)  # type: ignore[attr-defined]
        try:
            cache = self._cache
            if not cache.store(key, value, exptime):
                # As Django: a value not stored (too large) must not leave the old one behind.
                cache.delete(key)
        except self.server_errors as error:
            if not self._absorb(error, "set"):
                raise
            return False
        return None

    @_miss_on_server_error(_constant(False))
    def add(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> bool:
        return super().add(key, value, timeout, version)  # type: ignore[misc]

    @_miss_on_server_error(_constant(False))
    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        return super().touch(key, timeout, version)  # type: ignore[misc]

    @_miss_on_server_error(_constant(False))
    def delete(self, key: Any, version: Any = None) -> bool:
        return super().delete(key, version)  # type: ignore[misc]

    @_miss_on_server_error(_key_not_found)
    def incr(self, key: Any, delta: int = 1, version: Any = None) -> int:
        return super().incr(key, delta, version)  # type: ignore[misc]

    @_miss_on_server_error(_every_key)
    def set_many(
        self, data: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> list[Any]:
        keys = list(data)
        made = self._make_and_validate_keys(keys, version)
        failed = self._cache.set_multi(
            dict(zip(made, data.values(), strict=True)),
            self.get_backend_timeout(timeout),  # type: ignore[attr-defined]
        )
        if not failed:
            return []
        originals = dict(zip(made, keys, strict=True))
        return [originals[key] for key in failed]

    @_miss_on_server_error(_constant(None))
    def delete_many(self, keys: Any, version: Any = None) -> None:
        self._cache.delete_multi(self._make_and_validate_keys(list(keys), version))

    @_miss_on_server_error(_constant(None))
    def clear(self) -> None:
        return super().clear()  # type: ignore[misc]
