"""
Nanosecond costs of the Python a Django cache call runs before it reaches the client.

Round trips to memcached take tens of microseconds and vary by more than that from one
measurement to the next on a shared machine, so the few hundred nanoseconds a backend adds
cannot be read off the operation timings. They are timed here on their own:

* pieces: the node-list check behind ``cache._cache`` (ours is a property that asks the
  topology; stock's is a ``cached_property``, a plain attribute after the first access),
  and Django's key building and validation, which every call pays once per key;
* whole calls with the client replaced by a stub that answers at once: everything the
  backend and Django do per call, and nothing of the network;
* for the pymemcache-based backends, the choice of a key's node: pymemcache's rendezvous
  hash runs a pure-Python murmur3 over "node-key" for every node, so its cost grows with
  the number of nodes and the length of their names.

Statements are compiled by ``timeit``, so no Python call wraps them, and each is repeated
enough times to last about ``SECONDS``, rounds interleaved across caches.
"""

from __future__ import annotations

import copy
import statistics
import timeit
from collections.abc import Mapping
from typing import Any

SECONDS = 0.02
"""How long one timing of one statement lasts, about."""

PIECES = {
    "_cache": "cache._cache",
    "make_and_validate_key": "cache.make_and_validate_key(key)",
    "get_backend_timeout": "cache.get_backend_timeout()",
}

CALLS = {
    "get": "cache.get(key)",
    "set": "cache.set(key, value)",
    "get_many(100)": "cache.get_many(keys)",
    "set_many(100)": "cache.set_many(mapping)",
    "incr": "cache.incr(key)",
    "delete": "cache.delete(key)",
}

KEY = "bench:user:12345:profile"
MADE_KEY = f":1:{KEY}"
"""``KEY`` as Django's default key function makes it, what a client hashes."""
KEYS = [f"{KEY}:{i}" for i in range(100)]
VALUE = b"v" * 100


class StubClient:
    """A client that answers at once, as if every value were there and every write took."""

    def get(self, key: str, default: Any = None) -> Any:
        return VALUE

    def set(self, key: str, value: Any, time: int = 0) -> bool:
        return True

    def get_multi(self, keys: Any) -> dict[str, Any]:
        return dict.fromkeys(keys, VALUE)

    def set_multi(self, mapping: Mapping[str, Any], time: int = 0) -> list[str]:
        return []

    def incr(self, key: str, delta: int = 1) -> int:
        return 1

    def delete(self, key: str) -> bool:
        return True


def with_stub_client(cache: Any) -> Any:
    """
    A copy of the backend whose ``_cache`` is the stub, a plain class attribute that
    replaces the property or ``cached_property`` (the check is timed on its own).
    """
    clone = copy.copy(cache)
    clone.__dict__.pop("_cache", None)
    backend = type(cache)
    clone.__class__ = type(f"Stubbed{backend.__name__}", (backend,), {"_cache": StubClient()})
    return clone


def namespace(cache: Any) -> dict[str, Any]:
    return {
        "cache": cache,
        "key": KEY,
        "made_key": MADE_KEY,
        "keys": KEYS,
        "value": VALUE,
        "mapping": dict.fromkeys(KEYS, VALUE),
    }


def repetitions(statement: str, space: dict[str, Any]) -> int:
    """How many executions last about ``SECONDS``, from a short trial."""
    number = 10
    elapsed = timeit.Timer(statement, globals=space).timeit(number)
    return max(10, min(1_000_000, round(number * SECONDS / max(elapsed, 1e-9))))


def ns_each(
    statements: Mapping[str, str], caches: Mapping[str, Any], rounds: int
) -> dict[str, dict[str, float]]:
    """Median nanoseconds of each statement on each cache, less the empty loop's."""
    return ns_each_in(
        statements, {name: namespace(cache) for name, cache in caches.items()}, rounds
    )


def ns_each_in(
    statements: Mapping[str, str], spaces: Mapping[str, dict[str, Any]], rounds: int
) -> dict[str, dict[str, float]]:
    """Median nanoseconds of each statement in each namespace, less the empty loop's."""
    first = next(iter(spaces.values()))
    numbers = {what: repetitions(statement, first) for what, statement in statements.items()}
    samples: dict[str, dict[str, list[float]]] = {
        what: {name: [] for name in spaces} for what in statements
    }
    order = list(spaces.items())
    for round_index in range(rounds):
        rotation = round_index % len(order)
        for name, space in order[rotation:] + order[:rotation]:
            for what, statement in statements.items():
                number = numbers[what]
                empty = timeit.Timer("pass", globals=space).timeit(number)
                elapsed = timeit.Timer(statement, globals=space).timeit(number)
                samples[what][name].append(max(elapsed - empty, 0.0) / number * 1e9)
    return {
        what: {name: statistics.median(values) for name, values in by_cache.items()}
        for what, by_cache in samples.items()
    }


NODE_CHOICE = {"node_choice": "choose(made_key)"}


def node_chooser(client: Any) -> tuple[Any, list[str]]:
    """
    How a client picks a key's node, and the names it hashes: pymemcache's ``HashClient``
    asks its hasher; ours (a ``routing.ClusterClient``) its placement.
    """
    if hasattr(client, "hasher"):
        return client.hasher.get_node, list(client.hasher.nodes)
    names = [f"{pool.node.hostname or pool.node.ip}:{pool.node.port}" for pool in client.pools]
    return client.pool_for, names


def measure(
    caches: Mapping[str, Any],
    layered: tuple[str, ...],
    rounds: int,
    hashed: tuple[str, ...] = (),
) -> dict[str, Any]:
    """
    The pieces on every cache, whole stubbed calls on the ``layered`` ones, and the node
    choice of the ``hashed`` ones (pymemcache-based), with the names their clients hash.
    """
    stubbed = {name: with_stub_client(caches[name]) for name in layered}
    choosers = {name: node_chooser(caches[name]._cache) for name in hashed}
    spaces = {
        name: {"choose": choose, "made_key": MADE_KEY} for name, (choose, _) in choosers.items()
    }
    return {
        "pieces": ns_each(PIECES, caches, rounds),
        "calls": ns_each(CALLS, stubbed, rounds),
        "node_choice": ns_each_in(NODE_CHOICE, spaces, rounds),
        "node_names": {name: names for name, (_, names) in choosers.items()},
    }
