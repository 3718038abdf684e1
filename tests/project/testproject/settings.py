"""
A minimal Django project with the app installed and one cache on an ElastiCache backend.

The tests run its manage.py as a subprocess and serve its views (``views.py``) with gunicorn
and uvicorn (``test_servers.py``); they choose the cache through the environment:
``ELASTICACHE_LOCATION`` (required), ``ELASTICACHE_BACKEND`` (default: the pylibmc backend)
and ``ELASTICACHE_OPTIONS`` (JSON, default none).
"""

import json
import os

SECRET_KEY = "test project, not secret"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
ROOT_URLCONF = "testproject.urls"
USE_TZ = True
INSTALLED_APPS = ["django_elasticache"]
DATABASES = {}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

CACHES = {
    "default": {
        "BACKEND": os.environ.get(
            "ELASTICACHE_BACKEND", "django_elasticache.memcached.ElastiCache"
        ),
        "LOCATION": os.environ["ELASTICACHE_LOCATION"],
        "OPTIONS": json.loads(os.environ.get("ELASTICACHE_OPTIONS", "{}")),
    },
}

# A request that fails writes its traceback to the server's log, where the tests show it.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}
