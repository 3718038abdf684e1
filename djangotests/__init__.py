"""
Django's own cache test suite, run against this package's backends on a LocalCluster.

``python djangotests/run.py`` is the entry point; the other modules are what it hands to
Django's ``tests/runtests.py``: ``settings`` (the ``--settings`` module), ``runner`` (the
test runner it names) and ``cases`` (the test classes, subclasses of Django's own).
"""
