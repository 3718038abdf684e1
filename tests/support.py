"""Helpers shared by the test modules: waiting, forked children, processes, sockets, the
machine's IPv6 loopback, what a local cluster advertises."""

from __future__ import annotations

import contextlib
import linecache
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pylibmc
import pytest

from django_elasticache import memcached

READ_TIMEOUT = 5.0
# Generous: a loaded machine may take a while to deliver a death signal and reap.
DEATH_TIMEOUT = 20.0
# How long a test waits for something to happen in the background (a refresh, a scale-out).
DEADLINE = 10.0
POLL_INTERVAL = 0.02
REPORT_LIMIT = 4096


def timeout_rules(cache_class: type) -> tuple[dict[str, Any], type[Exception]]:
    """Short timeouts (0.3 s) for a backend, and what its library raises when one expires."""
    if issubclass(cache_class, memcached.ElastiCache):
        return {"behaviors": {"connect_timeout": 300, "_poll_timeout": 300}}, pylibmc.Error
    return {"connect_timeout": 0.3, "timeout": 0.3}, TimeoutError


class Interrupted(BaseException):
    """Not an ``Exception``, as ``KeyboardInterrupt`` and ``gevent.Timeout`` are not."""


@contextlib.contextmanager
def raised_in(
    function_name: str, interruption: BaseException, at_line: str | None = None
) -> Iterator[None]:
    """
    Raise ``interruption`` in this thread in the first function called ``function_name``:
    as it starts, before its first line, or with ``at_line`` as it reaches its line that
    starts with that text, before the line runs. That is where a signal handler's exception
    lands when the signal comes at that bytecode, made certain rather than lucky.
    """

    def trace(frame: Any, event: str, arg: object) -> Any:
        if event == "call":
            if frame.f_code.co_name != function_name:
                return None
            if at_line is None:
                sys.settrace(None)
                raise interruption
            return trace
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        if event == "line" and line.startswith(at_line or ""):
            sys.settrace(None)
            frame.f_trace = None
            raise interruption
        return trace

    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(None)


def eventually(condition: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    """Wait for condition() within timeout, polling; fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"within {timeout} s: {what}")
        time.sleep(POLL_INTERVAL)


class ForkedChild:
    """Run work() in a forked child process, which reports the text work() returns.

    The child never returns into pytest: it exits 0 after reporting, 1 if work() raised.
    Several children can run at once; report() waits for one and checks its exit.
    """

    def __init__(self, work: Callable[[], str]) -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read)
                os.write(write, work().encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        self._pid, self._read = pid, read

    def report(self) -> str:
        """What the child reported, once it exited; fail if it did not exit cleanly."""
        _, status = os.waitpid(self._pid, 0)
        try:
            report = os.read(self._read, REPORT_LIMIT).decode()
        finally:
            os.close(self._read)
        assert os.waitstatus_to_exitcode(status) == 0, f"the child failed; it reported {report!r}"
        return report


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(command, state, parent pid) of a process from /proc, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
    except OSError:
        return None
    rest = fields[1].split()
    return fields[0].split("(", 1)[1], rest[0], int(rest[1])


def memcached_children(parent: int | None = None) -> list[int]:
    """Pids of live memcached processes whose parent is parent (default: this process)."""
    parent = os.getpid() if parent is None else parent
    children = []
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(entry.name))
        if stat is not None and stat[0] == "memcached" and stat[1] != "Z" and stat[2] == parent:
            children.append(int(entry.name))
    return children


def process_state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, T for stopped, Z...), None if gone."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def is_alive(pid: int) -> bool:
    """Whether the process runs: gone or a zombie (dead, not yet reaped) is not alive."""
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"


def survivors(pids: list[int], timeout: float = DEATH_TIMEOUT) -> list[int]:
    """The pids still alive after waiting up to timeout for all of them to die."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if is_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def read_until_closed(conn: socket.socket) -> bytes:
    """Read everything the server sends until it closes the connection."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + READ_TIMEOUT
    while time.monotonic() < deadline:
        chunk = conn.recv(4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    raise AssertionError(f"server did not close the connection; got {b''.join(chunks)!r}")


def ask(node: Any, command: bytes, terminator: bytes) -> bytes:
    """Send a command to a clear-text node on a connection of its own; read to the terminator."""
    with socket.create_connection((node.ip, node.port), timeout=READ_TIMEOUT) as conn:
        conn.sendall(command)
        reply = b""
        while not reply.endswith(terminator):
            chunk = conn.recv(1 << 20)
            if not chunk:
                raise AssertionError(f"{node} closed the connection after {reply!r}")
            reply += chunk
        return reply


def node_stats(node: Any) -> dict[str, str]:
    """A clear-text node's ``stats``, as memcached itself reports them."""
    lines = (
        line.split(" ", 2) for line in ask(node, b"stats\r\n", b"END\r\n").decode().splitlines()
    )
    return {line[1]: line[2] for line in lines if line[0] == "STAT"}


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


requires_ipv6 = pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback")


NodeTuple = tuple[str, str, int]
FIRST_THREE_HOSTNAMES = [
    "local.abc123.0001.cache.local",
    "local.abc123.0002.cache.local",
    "local.abc123.0003.cache.local",
]


def advertised(nodes: Sequence[Any]) -> list[NodeTuple]:
    """The (hostname, ip, port) entries a config lists for these nodes."""
    return [(node.hostname, node.ip, node.port) for node in nodes]


def assert_lists_a_new_three_node_cluster(
    cluster: Any, config: tuple[int, list[NodeTuple]]
) -> None:
    """A parsed config of a freshly started three-node LocalCluster lists its nodes under
    ElastiCache-like hostnames, at version 1, and the cluster's location is its endpoint."""
    version, nodes = config
    assert version == cluster.config_version == 1
    assert nodes == advertised(cluster.nodes)
    assert [hostname for hostname, _, _ in nodes] == FIRST_THREE_HOSTNAMES
    assert cluster.location == f"127.0.0.1:{cluster.endpoint.port}"


def parse_config_reply(reply: bytes) -> tuple[int, list[NodeTuple]]:
    """Parse a ``config get cluster`` reply strictly by the grammar, byte count included."""
    header, rest = reply.split(b"\r\n", 1)
    name, key, flags, length = header.split(b" ")
    assert (name, key, flags) == (b"CONFIG", b"cluster", b"0")
    payload, trailer = rest[: int(length)], rest[int(length) :]
    assert trailer == b"\r\nEND\r\n"
    version, node_list, end = payload.split(b"\n")
    assert end == b""
    nodes = []
    for entry in node_list.decode().split(" "):
        hostname, ip, node_port = entry.split("|")
        nodes.append((hostname, ip, int(node_port)))
    return int(version), nodes


@contextlib.contextmanager
def stopped(node: Any) -> Iterator[None]:
    """
    The node's process stopped: it neither reads nor answers until the block ends. ``kill``
    returns before the stop takes hold: one of memcached's threads must first take the
    signal, and until it has run, the worker thread may still answer a request sent now.
    Stopped (state ``T``), every thread stops before it runs again.
    """
    os.kill(node.pid, signal.SIGSTOP)
    try:
        eventually(lambda: process_state(node.pid) == "T", f"node {node.pid} stopped")
        yield
    finally:
        os.kill(node.pid, signal.SIGCONT)


def long_reply_timeout(cache_class: type) -> dict[str, object]:
    """Options under which a call waits 20 s for a node's reply, however loaded the machine."""
    if issubclass(cache_class, memcached.ElastiCache):
        return {"behaviors": {"_poll_timeout": 20_000}}
    return {"timeout": 20}
