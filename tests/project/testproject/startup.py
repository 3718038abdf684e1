"""What the project does as its application module is imported."""

import os


def warm_cache_if_asked() -> None:
    """
    With ``ELASTICACHE_WARM_AT_IMPORT`` set, use the cache now, as an application that warms
    its cache on start: a pre-fork server that loads the application first (gunicorn's
    ``--preload``, uWSGI by default) then forks its workers from a process with connections.
    """
    if os.environ.get("ELASTICACHE_WARM_AT_IMPORT"):
        from django.core.cache import cache

        cache.set("warmed-by", str(os.getpid()))
