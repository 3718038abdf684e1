"""
Run Django's own cache test suite against both backends of django-elasticache.

Usage, from any directory, in an environment with this package, pylibmc and pymemcache::

    python djangotests/run.py [runtests.py options, e.g. -v 2 or -k incr]

1. Finds the test suite of the installed Django version. Django's wheel has no tests, so
   the sdist is downloaded once with ``pip download`` into ``$DJANGOTESTS_CACHE``
   (default ``djangotests/.cache/``, git-ignored) and its ``tests/`` extracted there;
   later runs reuse it without a network.
2. Starts a ``LocalCluster``: real memcached nodes behind an emulated configuration
   endpoint, on 127.0.0.1.
3. Runs ``tests/runtests.py cache --parallel 1 --settings djangotests.settings``: Django's
   ``PyLibMCCacheTests`` and ``PyMemcacheCacheTests``, with the ``BaseMemcachedTests`` and
   ``BaseCacheTests`` they inherit, against ``memcached.ElastiCache`` and
   ``pymemcache.ElastiCache`` on that cluster (see ``cases.py`` for how, and for the tests
   excluded as inapplicable). One process only: the memcached tests flush the servers.
4. Prints each backend's counts, every failure, the exclusions with their reasons, and
   ``django-suite: N passed, N failed``; exits non-zero if any test failed or did not run.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from django_elasticache.testing import LocalCluster

HERE = Path(__file__).resolve().parent
CACHE_VARIABLE = "DJANGOTESTS_CACHE"
DOWNLOAD_TIMEOUT = 120
"""Seconds for pip to fetch the sdist (about 11 MB)."""
SUITE_TIMEOUT = 150
"""Seconds for the whole Django run, which takes about 30 on two cores."""
OUTCOMES = ("passed", "failed", "excluded", "skipped by Django")
ACCEPTED = {"passed", "excluded", "skipped by Django"}
"""Outcomes that are not failures; "skipped" (for a reason not listed in cases.py) is one."""


def main(argv: list[str]) -> int:
    version = importlib.metadata.version("Django")
    tests_dir = django_tests(version, Path(os.environ.get(CACHE_VARIABLE) or HERE / ".cache"))
    with LocalCluster(nodes=3) as cluster, tempfile.TemporaryDirectory() as scratch:
        report_file = Path(scratch) / "report.json"
        status = run_django_tests(tests_dir, cluster.location, report_file, argv)
        report = json.loads(report_file.read_text()) if report_file.exists() else None
    return summarize(version, report, status)


def django_tests(version: str, cache: Path) -> Path:
    """
    The ``tests/`` directory of Django ``version``'s sdist, downloaded on first use; the
    sdist itself is not kept, since only its tests are ever used.
    """
    tests_dir = cache / f"django-{version}" / "tests"
    if not (tests_dir / "runtests.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        sdist = download_sdist(version, cache)
        extract_tests(sdist, tests_dir)
        sdist.unlink()
    return tests_dir


def download_sdist(version: str, into: Path) -> Path:
    """Fetch Django's sdist with pip, the way the brief's reviewers can reproduce by hand."""
    command = [sys.executable, "-m", "pip", "download", "--no-binary=:all:", "--no-deps"]
    command += ["--disable-pip-version-check", "--dest", str(into), f"Django=={version}"]
    subprocess.run(command, check=True, timeout=DOWNLOAD_TIMEOUT, stdout=subprocess.DEVNULL)
    found = [
        path for path in into.glob("*.tar.gz") if path.name.lower().endswith(f"-{version}.tar.gz")
    ]
    if not found:
        raise RuntimeError(f"pip reported success but left no Django {version} sdist in {into}")
    return found[0]


def extract_tests(sdist: Path, tests_dir: Path) -> None:
    """
    Unpack only the sdist's ``tests/`` into ``tests_dir``, through a temporary directory
    renamed into place, so an interrupted run never leaves a half-extracted copy to reuse.
    """
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        members = [member for member in archive if member.name.startswith(f"{top}/tests/")]
        staging = Path(tempfile.mkdtemp(dir=tests_dir.parent.parent))
        try:
            extract = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(staging, members=members, **extract)
            tests_dir.parent.mkdir(parents=True, exist_ok=True)
            (staging / top / "tests").rename(tests_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def run_django_tests(tests_dir: Path, location: str, report: Path, options: list[str]) -> int:
    """Run Django's runtests.py on our test classes; its exit status, or -1 on a timeout."""
    command = [sys.executable, str(tests_dir / "runtests.py"), "cache", "--parallel", "1"]
    command += ["--settings", "djangotests.settings", *options]
    python_path = [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(python_path),
        "DJANGOTESTS_LOCATION": location,
        "DJANGOTESTS_REPORT": str(report),
        "PYTHONUNBUFFERED": "1",  # keep Django's header and its test dots in order
    }
    try:
        return subprocess.run(command, env=environment, timeout=SUITE_TIMEOUT).returncode
    except subprocess.TimeoutExpired:
        print(f"error: Django's test run exceeded {SUITE_TIMEOUT} s", file=sys.stderr)
        return -1


def summarize(version: str, report: dict[str, Any] | None, status: int) -> int:
    """Print the summary; the exit status: 0 only if every test that should run passed."""
    if report is None:
        print(f"django-suite: no report from Django's test run (exit status {status})")
        return 1
    by_backend: dict[str, Counter[str]] = {}
    failures = []
    for test_id, test in sorted(report["tests"].items()):
        by_backend.setdefault(test["backend"], Counter())[test["outcome"]] += 1
        if test["outcome"] not in ACCEPTED:
            failures.append(f"  {test['outcome'].upper()} {test_id}: {test['reason']}")
    print(f"\nDjango {version}'s cache tests, per backend:")
    for backend, counts in by_backend.items():
        print(f"  {backend}: " + ", ".join(f"{counts[name]} {name}" for name in OUTCOMES))
    if failures:
        print("Failed, or skipped for no listed reason:", *failures, sep="\n")
    print_reasons(
        "Excluded as inapplicable to a backend that discovers its nodes:", report["excluded"]
    )
    print_reasons("Skipped by Django's tests themselves:", report["skipped by Django"])
    passed = sum(counts["passed"] for counts in by_backend.values())
    print(f"django-suite: {passed} passed, {len(failures)} failed")
    return 1 if failures or status != 0 else 0


def print_reasons(title: str, reasons: dict[str, str]) -> None:
    print(title)
    for name, reason in reasons.items():
        print(f"  {name}: {reason}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
