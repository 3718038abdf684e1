"""
The project's WSGI application. With ``ELASTICACHE_WARM_AT_IMPORT`` set, the cache is used
as the module is imported, as by an application that warms its cache on start: a pre-fork
server started with ``--preload`` then forks its workers from a process with connections.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
application = get_wsgi_application()

if os.environ.get("ELASTICACHE_WARM_AT_IMPORT"):
    from django.core.cache import cache

    cache.set("warmed-by", str(os.getpid()))
