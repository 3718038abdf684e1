"""
The optional Django app: add ``"django_elasticache"`` to INSTALLED_APPS for the system
checks and the ``elasticache`` management command. The cache backends need neither.
"""

from __future__ import annotations

from django.apps import AppConfig


class ElastiCacheConfig(AppConfig):
    name = "django_elasticache"
    verbose_name = "ElastiCache"

    def ready(self) -> None:
        # Importing the module registers its checks with Django's check framework.
        from . import checks  # noqa: F401
