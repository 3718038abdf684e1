"""
The ``--settings`` module for Django's ``runtests.py``.

Django's suite expects its own default test settings (an SQLite database for the models
its cache tests store); they are imported from the suite's ``test_sqlite`` module, which
``runtests.py`` makes importable, so they always match the Django version being tested.
CACHES is left alone: the memcached test classes are pointed at our backends by ``cases``.
"""

from test_sqlite import *  # noqa: F403

TEST_RUNNER = "djangotests.runner.ElastiCacheSuiteRunner"
