"""
What COMPRESS_MIN_LENGTH saves in node memory, and what it costs in CPU, per value.

Four values a Django site caches: an HTML fragment (~20 KB of repetitive markup), a JSON API
response (~5 KB), a pickled "queryset" (a list of 200 small dicts) and a 300-byte string. Each
is serialized as the backends serialize it (``pickle`` for objects, UTF-8 for text), then put
through ``compression.compressed`` and ``compression.decompressed``, the code both backends
run, at several thresholds. For each: the bytes the node stores, and the microseconds to
compress on ``set`` and to decompress on ``get`` (median of several rounds). No memcached
is involved: the network cost of the bytes saved is not counted.

Every ``zlib.compress`` call costs about 50 us before its first byte (it sets up a fresh
deflate state of a few hundred KB), which is why the 300-byte string costs as much to compress
as the 5 KB response.

Run: ``python -m benchmarks.compression`` (``--rounds N`` for more rounds).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pickle
import random
import statistics
import time
from collections.abc import Callable

from django_elasticache.compression import compressed, decompressed

THRESHOLDS = (0, 256, 1024, 4096)
LOOPS = 200
"""Calls per timed round: enough to time a few microseconds, little for a shared machine."""


def html_fragment(rng: random.Random) -> bytes:
    """A product list as a template renders it: ~20 KB, the same markup around varying data."""
    rows = []
    for index in range(60):
        name = " ".join(
            rng.choice(("Blue", "Wool", "Classic", "Slim", "Jacket", "Shirt", "Lamp"))
            for _ in range(3)
        )
        rows.append(
            f'<li class="product-card" data-id="{rng.randrange(10**6)}">'
            f'<a href="/products/{index}-{name.lower().replace(" ", "-")}/">'
            f'<img src="/media/products/{rng.randrange(10**8):08d}.jpg" alt="{name}" '
            f'loading="lazy" width="240" height="240"></a>'
            f'<h3 class="product-card__title">{name}</h3>'
            f'<p class="product-card__price">${rng.randrange(500, 20000) / 100:.2f}</p>'
            f'<button type="submit" class="btn btn-primary">Add to cart</button></li>\n'
        )
    return ('<ul class="product-list">\n' + "".join(rows) + "</ul>\n").encode()


def json_response(rng: random.Random) -> bytes:
    """An API page of 20 orders: ~5 KB of JSON, stored as text."""
    orders = [
        {
            "id": rng.randrange(10**9),
            "status": rng.choice(("paid", "shipped", "refunded")),
            "customer": {
                "id": rng.randrange(10**6),
                "email": f"user{rng.randrange(10**5)}@example.com",
            },
            "total": f"{rng.randrange(100, 100000) / 100:.2f}",
            "currency": "USD",
            "created_at": f"2026-11-{rng.randrange(1, 28):02d}T{rng.randrange(24):02d}:00:00Z",
            "items": [{"sku": f"SKU-{rng.randrange(10**6)}", "qty": rng.randrange(1, 4)}],
        }
        for _ in range(20)
    ]
    return json.dumps({"count": 20, "next": "/api/orders/?page=2", "results": orders}).encode()


def pickled_queryset(rng: random.Random) -> bytes:
    """200 rows as ``values()`` gives them, pickled as the backends pickle objects."""
    rows = [
        {
            "id": index,
            "username": f"user{rng.randrange(10**6)}",
            "is_active": rng.random() < 0.9,
            "date_joined": datetime.datetime(2026, 1, 1)
            + datetime.timedelta(seconds=rng.randrange(10**7)),
            "score": rng.random(),
        }
        for index in range(200)
    ]
    return pickle.dumps(rows, pickle.HIGHEST_PROTOCOL)


def short_string(rng: random.Random) -> bytes:
    """A 300-byte sentence-like string: a title, a flash message, a small JSON blob."""
    words = ("the", "order", "was", "shipped", "to", "your", "address", "on", "monday", "thanks")
    text = ""
    while len(text) < 300:
        text += rng.choice(words) + " "
    return text[:300].encode()


VALUES: dict[str, Callable[[random.Random], bytes]] = {
    "HTML fragment": html_fragment,
    "JSON response": json_response,
    "pickled queryset": pickled_queryset,
    "300-byte string": short_string,
}


def median_us(call: Callable[[], object], rounds: int) -> float:
    """Median microseconds of one call over ``rounds`` rounds of ``LOOPS`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(LOOPS):
            call()
        times.append((time.perf_counter() - start) / LOOPS * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(2026)
    print(
        f"{'value':<18} {'threshold':>9} {'stored B':>9} {'saved':>6} {'set us':>7} {'get us':>7}"
    )
    for name, build in VALUES.items():
        data = build(rng)
        for threshold in THRESHOLDS:
            stored, flags = compressed(data, 0, threshold)
            assert decompressed(stored, flags) == (data, 0)
            set_us = median_us(functools.partial(compressed, data, 0, threshold), args.rounds)
            get_us = median_us(functools.partial(decompressed, stored, flags), args.rounds)
            saved = 1 - len(stored) / len(data)
            print(
                f"{name:<18} {threshold or 'off':>9} {len(stored):>9} {saved:>6.0%} "
                f"{set_us:>7.1f} {get_us:>7.1f}"
            )


if __name__ == "__main__":
    main()
