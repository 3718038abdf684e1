"""
A minimal Django project with the app installed and one cache on an ElastiCache backend.

The tests run its manage.py as a subprocess and choose the cache through the environment:
``ELASTICACHE_LOCATION`` (required), ``ELASTICACHE_BACKEND`` (default: the pylibmc backend)
and ``ELASTICACHE_OPTIONS`` (JSON, default none).
"""

import json
import os

SECRET_KEY = "test project, not secret"
DEBUG = False
ALLOWED_HOSTS = ["localhost"]
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
