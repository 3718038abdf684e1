"""
The test runner that Django's ``runtests.py`` uses with ``--settings djangotests.settings``.

``runtests.py`` installs the test apps its labels name, and the cache tests store instances
of the ``cache`` app's models; so run.py passes the label ``cache``, and this runner then
runs the classes in ``cases`` instead of that whole app. After the run it writes the outcome
of every test to the JSON file named by ``DJANGOTESTS_REPORT``, for run.py's summary.
"""

from __future__ import annotations

import json
import os
import unittest
from typing import Any

from django.test.runner import DiscoverRunner
from django.test.utils import iter_test_cases

CASES_MODULE = "djangotests.cases"
REPORT_VARIABLE = "DJANGOTESTS_REPORT"
OUTSIDE = "outside any test"


class ElastiCacheSuiteRunner(DiscoverRunner):
    """Django's own runner, given our test classes and reporting their outcomes."""

    def build_suite(
        self, test_labels: Any = None, *args: Any, **kwargs: Any
    ) -> unittest.TestSuite:
        """
        The labels only told runtests.py which test app to install; run ``cases``. (Django
        4.2 passes a further positional argument, extra_tests.)
        """
        return super().build_suite([CASES_MODULE], *args, **kwargs)

    def run_suite(self, suite: unittest.TestSuite, **kwargs: Any) -> unittest.TestResult:
        # unittest drops each test from its suite once run: note them all beforehand.
        backends = {test.id(): test.base_params["BACKEND"] for test in iter_test_cases(suite)}
        result = super().run_suite(suite, **kwargs)
        report = os.environ.get(REPORT_VARIABLE)
        if report:
            text = json.dumps(outcomes(backends, result), indent=1)
            with open(report, "w", encoding="utf-8") as file:
                file.write(text)
        return result


def outcomes(backends: dict[str, str], result: unittest.TestResult) -> dict[str, Any]:
    """
    The outcome of each test run, given the backend of each test id.

    ``{"tests": {id: {"backend", "outcome", "reason"}}, "excluded": {name: reason}, ...}``,
    outcome one of passed, failed, excluded (``cases.EXCLUDED``), skipped by Django
    (``cases.SKIPPED_BY_DJANGO``) or skipped (for any other, unexplained reason). A test
    with a failing subtest has failed; an error outside any test (a class's setup) is
    reported under its description.
    """
    from .cases import EXCLUDED, SKIPPED_BY_DJANGO  # needs the cache test app installed

    tests = {test_id: _outcome(backend, "passed") for test_id, backend in backends.items()}
    for test, reason in result.skipped:
        name = test.id().rpartition(".")[2]
        outcome = "excluded" if name in EXCLUDED else "skipped"
        if name in SKIPPED_BY_DJANGO:
            outcome = "skipped by Django"
        tests[test.id()] = _outcome(backends.get(test.id(), OUTSIDE), outcome, reason)
    problems = [*result.failures, *result.errors]
    problems += [(test, "unexpected success") for test in result.unexpectedSuccesses]
    for test, detail in problems:
        test_id = getattr(test, "test_case", test).id()
        backend = backends.get(test_id, OUTSIDE)
        tests[test_id] = _outcome(backend, "failed", _exception_line(detail))
    return {"tests": tests, "excluded": EXCLUDED, "skipped by Django": SKIPPED_BY_DJANGO}


def _outcome(backend: str, outcome: str, reason: str = "") -> dict[str, str]:
    return {"backend": backend, "outcome": outcome, "reason": reason}


def _exception_line(detail: str) -> str:
    """
    The first line of the exception a traceback ends with (``AssertionError: ...``): its
    first unindented line after the last ``Traceback`` header. Enough for a summary line.
    """
    lines = detail.splitlines()
    headers = [index for index, line in enumerate(lines) if line.startswith("Traceback")]
    start = headers[-1] + 1 if headers else 0
    for line in lines[start:]:
        if line and not line[0].isspace():
            return line
    return detail.strip().splitlines()[-1] if detail.strip() else ""
