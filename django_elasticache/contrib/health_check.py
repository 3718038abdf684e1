"""
A check for django-health-check (version 4 and later): every node of every cluster.

django-health-check's own ``Cache`` check writes and reads one key, which lands on one node
of a cluster and says nothing about the others. ``ElastiCache`` asks every node of every
cache on this package's backends (or of one ``alias``), in parallel, within ``timeout``::

    path("health/", HealthCheckView.as_view(checks=[
        "health_check.checks.Database",
        "django_elasticache.contrib.health_check.ElastiCache",
    ])),

A cluster that cannot be discovered or whose nodes all fail is reported unavailable; a
cluster with some node down, as a warning (both make the health view answer 500).
"""

from __future__ import annotations

import dataclasses
import datetime

try:
    from health_check.base import HealthCheck
    from health_check.exceptions import ServiceUnavailable, ServiceWarning
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "django_elasticache.contrib.health_check needs django-health-check 4 or later: "
        "pip install django-health-check"
    ) from exc

from ..health import Status, check, our_cache_aliases

__all__ = ["ElastiCache"]


@dataclasses.dataclass
class ElastiCache(HealthCheck):
    """Every node of the ElastiCache clusters behind ``alias`` (None: every such cache)."""

    alias: str | None = None
    timeout: datetime.timedelta = dataclasses.field(
        default=datetime.timedelta(seconds=5), repr=False
    )

    def run(self) -> None:
        aliases = our_cache_aliases() if self.alias is None else [self.alias]
        if not aliases:
            raise ServiceUnavailable("no cache uses a django_elasticache backend")
        # Each cache costs a discovery and then its nodes (in parallel): two steps each.
        step = self.timeout.total_seconds() / (2 * len(aliases))
        reports = [check(alias, step) for alias in aliases]
        problems = [
            f"{report.alias}: {'; '.join(report.problems)}"
            for report in reports
            if report.status is not Status.HEALTHY
        ]
        worst = max(report.status for report in reports)
        if worst is Status.UNREACHABLE:
            raise ServiceUnavailable(" | ".join(problems))
        if worst is Status.DEGRADED:
            raise ServiceWarning(" | ".join(problems))
