"""What the figures were measured on, since they mean little without it."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

DISTRIBUTIONS = (
    "django-elasticache",
    "Django",
    "pylibmc",
    "pymemcache",
    "django-elastipymemcache",
    "matplotlib",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memcached_version() -> str:
    try:
        completed = subprocess.run(
            ["memcached", "-V"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return completed.stdout.strip().removeprefix("memcached ") or "unknown"


def libmemcached_version() -> str:
    import _pylibmc

    return str(getattr(_pylibmc, "libmemcached_version", "unknown"))


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load: how busy the shared machine was."""
    return [round(load, 2) for load in os.getloadavg()]


def describe() -> dict[str, object]:
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "libmemcached": libmemcached_version(),
        "memcached": memcached_version(),
        "versions": versions,
    }
