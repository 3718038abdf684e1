"""
``manage.py elasticache [alias] [--json] [--timeout S]``: how every cluster the project
caches on is doing, node by node, and what this process holds for it.

The exit status is made for container health checks and scripts: 0 when every node of every
cluster answers, 1 when some node does not (degraded), 2 when a cluster cannot be reached or
discovered, or the command cannot check at all (an unknown alias, invalid settings).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.core.cache.backends.base import InvalidCacheBackendError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...health import Status, check, format_report, our_cache_aliases


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0 seconds, got {text}")
    return value


class Command(BaseCommand):
    help = (
        "Show each ElastiCache cluster's nodes (engine, uptime, items, memory, hit ratio, "
        "evictions, connections) and this process's node list. Exit status: 0 healthy, "
        "1 some node down, 2 a cluster unreachable."
    )
    # A health probe must report a broken setting, not stop at it.
    requires_system_checks = ()

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "alias", nargs="?", help="one cache alias (default: every cache on our backends)"
        )
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        parser.add_argument(
            "--timeout",
            type=positive_seconds,
            help="seconds for discovery and for each node (default: DISCOVERY_TIMEOUT)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        aliases = [options["alias"]] if options["alias"] else our_cache_aliases()
        if not aliases:
            raise CommandError(
                "No cache in CACHES uses django_elasticache.memcached.ElastiCache or "
                "django_elasticache.pymemcache.ElastiCache",
                returncode=Status.UNREACHABLE,
            )
        try:
            reports = [check(alias, options["timeout"]) for alias in aliases]
        except InvalidCacheBackendError as exc:
            raise CommandError(str(exc), returncode=Status.UNREACHABLE) from None
        status = max(report.status for report in reports)
        if options["json"]:
            document = {
                "status": status.name.lower(),
                "caches": [report.as_dict() for report in reports],
            }
            self.stdout.write(json.dumps(document, indent=2))
        else:
            self.stdout.write("\n\n".join(format_report(report) for report in reports))
        self.stdout.flush()
        raise SystemExit(int(status))
