"""
What the package does in a process forked from one that used it, however it was forked.

A child must not use its parent's connections: both processes would read each other's
replies. ``os.fork`` (gunicorn, Celery's prefork pool, multiprocessing's fork) runs the
handlers given to ``os.register_at_fork``. uWSGI forks its workers itself and runs none of
them unless told to (``py-call-osafterfork``, which aborts its workers on Python 3.12 and
later), though it loads the application in the master first unless ``lazy-apps`` is set: a
master that used the cache as the application loaded would hand its connections to every
worker. It calls its own post-fork hook instead, so the handlers run from there too, joining
the chain of ``uwsgidecorators.postfork``. Where uWSGI runs both, each handler runs twice,
which each allows: the second run finds nothing left of the parent's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_handlers: list[Callable[[], None]] = []


def after_fork_in_child(handler: Callable[[], None]) -> None:
    """Run ``handler`` in every child forked from now on, before the child does anything else."""
    _handlers.append(handler)


def _run_handlers() -> None:
    for handler in _handlers:
        handler()


def _join_uwsgi_post_fork(run: Callable[[], None]) -> None:
    """
    Have uWSGI run ``run`` in each worker it forks, when this process is one of its, before
    any other post-fork hook: one run before it would use the parent's connections. ``run``
    goes first into ``uwsgidecorators``' chain, which an application importing that module
    later keeps; importing it replaces ``uwsgi.post_fork_hook`` and ``uwsgi.spooler``, so a
    hook or spooler set without it is kept. ``uwsgidecorators`` refuses to load without
    uWSGI's master process: ``run`` is then chained before whatever hook was set.
    """
    try:
        import uwsgi  # Only in a process uWSGI runs.
    except ImportError:
        return
    previous_hook = getattr(uwsgi, "post_fork_hook", None)
    previous_spooler = getattr(uwsgi, "spooler", None)
    try:
        import uwsgidecorators
    except Exception:  # It raises a bare Exception without the master process.
        uwsgi.post_fork_hook = _chained(run, previous_hook)
        return
    if previous_hook is not None and previous_hook is not uwsgidecorators.postfork_chain_hook:
        uwsgidecorators.postfork(previous_hook)
    if previous_spooler is not None:
        uwsgi.spooler = previous_spooler
    uwsgidecorators.postfork(run)
    chain = uwsgidecorators.postfork_chain
    chain.insert(0, chain.pop())


def _chained(run: Callable[[], None], then: Any) -> Callable[[], None]:
    if then is None:
        return run

    def run_then() -> None:
        run()
        then()

    return run_then


os.register_at_fork(after_in_child=_run_handlers)
_join_uwsgi_post_fork(_run_handlers)
