"""Child processes that die with the Python process that started them.

A memcached started with plain ``subprocess.Popen`` outlives a parent that is killed,
aborts, or is ended by a signal Python does not turn into an exception (SIGHUP from a
closed terminal, SIGQUIT, SIGTERM in a pytest run): it keeps its port and memory until
someone finds it. On Linux the child can ask the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), set between fork and exec. Two kernel rules shape the rest:

- "parent" means the *thread* that forked. A cluster started from a short-lived thread
  would lose its nodes when that thread ends, so every child is forked by one daemon
  thread that lives as long as the process.
- the setting is cleared when the child changes its user. memcached started as root must
  be told a user; it is told ``root``, which changes nothing, so the setting survives.

Elsewhere (macOS), children are started the ordinary way and stopped by the finalizers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, cast

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded now: the child between fork and exec must not load anything."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    function: Callable[..., int] = prctl
    return function


_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: ask for SIGKILL when the forking thread ends; die now if it already has.

    Runs in the child before exec, so it only calls what is already loaded.
    """
    if _prctl is None:
        return
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0) != 0:
        os._exit(127)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(127)


_Request = tuple[list[str], dict[str, Any], "Future[subprocess.Popen[bytes]]"]


class _Spawner:
    """One daemon thread that forks every child, so each child's parent thread lives on."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def popen(self, command: list[str], **options: Any) -> subprocess.Popen[bytes]:
        future: Future[subprocess.Popen[bytes]] = Future()
        self._ensure_thread()
        self._requests.put((command, options, future))
        return future.result()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="django-elasticache spawner", daemon=True
                )
                self._thread.start()

    def _serve(self) -> None:
        while True:
            command, options, future = self._requests.get()
            preexec = functools.partial(_die_with_parent, os.getpid())
            try:
                # Bytes: the options never ask for text mode (mypy cannot see that).
                process = cast(
                    "subprocess.Popen[bytes]",
                    subprocess.Popen(command, preexec_fn=preexec, **options),
                )
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(process)


_spawner = _Spawner()


def spawn(command: list[str], **options: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(command, **options)``, for a child that dies with this process."""
    return _spawner.popen(command, **options)
