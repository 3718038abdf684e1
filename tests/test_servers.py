"""
The test project served by the servers users deploy Django on, against a local cluster:
gunicorn pre-forking threaded workers from a process that used the cache (``--preload``)
and recycling them (``--max-requests``), gunicorn's gevent workers and uvicorn's worker
class, uWSGI forking its workers from the process that loaded the application, and uvicorn
on asyncio's loop and on uvloop's. Clients send real HTTP requests from several threads at
once; the tests assert what a user sees: every value read back is the one written, a
scale-out reaches every worker, no worker outlives the server, and connections are opened
per worker, not per request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import DEATH_TIMEOUT, ask, eventually, node_stats, stopped, survivors

from django_elasticache.testing import LocalCluster
from django_elasticache.testing.processes import spawn

PROJECT = Path(__file__).parent / "project"
BACKENDS = {
    "pylibmc": "django_elasticache.memcached.ElastiCache",
    "pymemcache": "django_elasticache.pymemcache.ElastiCache",
}
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 20.0
CLIENTS = 8
THREADS = 4
"""Threads per worker: each worker has at most this many clients of a node."""
CONNECTIONS_PER_CLIENT = {"pylibmc": 2, "pymemcache": 1}
"""A pylibmc client's multi-key calls have a connection of their own beside libmemcached's."""
UWSGI_END_CODE = 30
"""The exit status of a uWSGI worker that ended as it was told (``uwsgi.h``)."""


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    body: str
    served_by: int
    """The process id of the worker that served the request."""


class Server:
    """
    A server process serving the test project on a socket bound here and handed to it (no
    port is guessed), started from this process so that it dies with it.
    """

    def __init__(self, command: Callable[[int], list[str]], log: Path, **env: str) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.set_inheritable(True)
        self.port = self._listener.getsockname()[1]
        self._log_path = log
        self.answered_from: set[int] = set()
        """Every process that answered a request: the workers, ended after the test."""
        fd = self._listener.fileno()
        with open(log, "wb") as output:
            self.process = spawn(
                command(fd),
                cwd=PROJECT,
                env={**os.environ, "DJANGO_SETTINGS_MODULE": "testproject.settings", **env},
                stdout=output,
                stderr=subprocess.STDOUT,
                pass_fds=(fd,),
            )

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")[-4000:]

    def get(self, path: str) -> Answer:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read().decode()
            answer = Answer(response.status, body, int(response.getheader("X-Served-By") or 0))
        finally:
            connection.close()
        self.answered_from.add(answer.served_by)
        return answer

    def wait_until_serving(self) -> None:
        def serving() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                return self.get("/nodes").status == 200
            except OSError:
                return False

        eventually(serving, f"the server answers:\n{self.log()}", timeout=START_TIMEOUT)

    def stop(self) -> int:
        """SIGTERM, as a process manager stops a server: its exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(DEATH_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the server did not stop within {DEATH_TIMEOUT} s:\n{self.log()}")
        finally:
            self._listener.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start a server (``serve(command, **env)``) that answers; every one is stopped after."""
    servers: list[Server] = []

    def start(command: Callable[[int], list[str]], **env: str) -> Server:
        server = Server(command, tmp_path / f"server-{len(servers)}.log", **env)
        servers.append(server)
        server.wait_until_serving()
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.stop()
        # A worker a failed test left, or one uWSGI without its master left running (a
        # process of the project's server, not another that has its process id since).
        for pid in server.answered_from - {0}:
            with contextlib.suppress(OSError):
                if b"testproject." in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def gunicorn(*options: str, app: str = "testproject.wsgi") -> Callable[[int], list[str]]:
    return lambda fd: [sys.executable, "-m", "gunicorn", "--bind", f"fd://{fd}", *options, app]


def uwsgi(*options: str) -> Callable[[int], list[str]]:
    """uWSGI as pip installs it, beside this interpreter; it stops on SIGTERM as others do."""
    executable = str(Path(sys.executable).parent / "uwsgi")
    return lambda fd: [
        executable,
        f"--http-socket=fd://{fd}",
        "--module=testproject.wsgi:application",
        "--need-app",
        "--die-on-term",
        *options,
    ]


def uvicorn(loop: str) -> Callable[[int], list[str]]:
    return lambda fd: [
        sys.executable,
        "-m",
        "uvicorn",
        "--fd",
        str(fd),
        "--loop",
        loop,
        "--lifespan",
        "off",
        "--no-access-log",
        "testproject.asgi:application",
    ]


def cache_env(cluster: LocalCluster, backend: str, **options: Any) -> dict[str, str]:
    return {
        "ELASTICACHE_LOCATION": cluster.location,
        "ELASTICACHE_BACKEND": BACKENDS[backend],
        "ELASTICACHE_OPTIONS": json.dumps(options),
    }


def round_trips(
    server: Server, rounds: int, remember: str = "remember", recall: str = "recall"
) -> tuple[list[str], set[int]]:
    """
    ``CLIENTS`` clients at once, each writing ``rounds`` keys of its own with values no other
    writes and reading each back, then all of them with one ``get_many``: what came back
    wrong, and the processes that served them.
    """

    def client(index: int) -> tuple[list[str], set[int]]:
        wrong: list[str] = []
        served_by: set[int] = set()
        written: dict[str, str] = {}
        for round_index in range(rounds):
            key = f"client{index}-{round_index}"
            value = written[key] = f"{key}-{secrets.token_hex(8)}"
            stored = server.get(f"/{remember}/{key}?value={value}")
            read = server.get(f"/{recall}/{key}")
            if (stored.status, read.status, read.body) != (200, 200, value):
                wrong.append(f"{key}: wrote {value!r} ({stored.status}), read {read}")
            served_by |= {stored.served_by, read.served_by}
        many = server.get(f"/recall-many?keys={','.join(written)}")
        if many.status != 200 or json.loads(many.body) != written:
            wrong.append(f"get_many of client {index}'s keys: {many}")
        return wrong, served_by | {many.served_by}

    with ThreadPoolExecutor(CLIENTS) as clients:
        outcomes = list(clients.map(client, range(CLIENTS)))
    return [w for wrong, _ in outcomes for w in wrong], set().union(*(s for _, s in outcomes))


def connections_accepted(cluster: LocalCluster) -> list[int]:
    """Each node's connections accepted since it started (this request's among them)."""
    return [int(node_stats(node)["total_connections"]) for node in cluster.nodes]


def connections_accepted_since(before: list[int], cluster: LocalCluster) -> list[int]:
    after = connections_accepted(cluster)
    return [now - then for now, then in zip(after, before, strict=True)]


def most_connections(workers: int, backend: str) -> int:
    """
    The most connections a node may accept while the workers serve: the stats request
    counting them, the write of the process that loaded the application, and the clients
    of each thread of each worker.
    """
    return 2 + workers * THREADS * CONNECTIONS_PER_CLIENT[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_preloaded_threaded_workers_recycled_while_serving_read_their_own_values(
    elasticache_cluster: LocalCluster, serve: Callable[..., Server], backend: str
) -> None:
    """
    gunicorn ``--preload``: the master imports the application, which writes to the cache,
    and forks the workers with those connections open; ``--max-requests`` replaces each
    worker after a few requests, so workers are forked all along. No worker may read a
    reply meant for another process, nor open connections per request.
    """
    before = connections_accepted(elasticache_cluster)
    server = serve(
        gunicorn(
            "--preload",
            "--workers=2",
            "--worker-class=gthread",
            f"--threads={THREADS}",
            "--max-requests=40",
            "--graceful-timeout=10",
        ),
        ELASTICACHE_WARM_AT_IMPORT="1",
        **cache_env(elasticache_cluster, backend),
    )
    warmed = server.get("/recall/warmed-by")
    assert (warmed.status, warmed.body) == (200, str(server.process.pid))

    wrong, workers = round_trips(server, rounds=30)

    assert wrong == []
    assert len(workers) >= 6, "workers were recycled while serving"
    assert server.get("/recall/warmed-by").body == str(server.process.pid)
    assert server.stop() == 0
    assert survivors(sorted(workers)) == []
    opened = connections_accepted_since(before, elasticache_cluster)
    assert max(opened) <= most_connections(len(workers), backend), opened


def test_every_preforked_worker_follows_a_scale_out(
    elasticache_cluster: LocalCluster, serve: Callable[..., Server]
) -> None:
    server = serve(
        gunicorn("--preload", "--workers=2"),
        ELASTICACHE_WARM_AT_IMPORT="1",
        **cache_env(elasticache_cluster, "pylibmc", REFRESH_INTERVAL=0.5),
    )
    assert round_trips(server, rounds=3)[0] == []
    added = elasticache_cluster.add_node()
    grown = sorted(elasticache_cluster.node_addresses)

    def every_worker_serves_the_grown_list() -> bool:
        answers = [server.get("/nodes") for _ in range(12)]
        return all(json.loads(answer.body)["nodes"] == grown for answer in answers)

    eventually(every_worker_serves_the_grown_list, "every worker serves the grown node list")
    wrong, _ = round_trips(server, rounds=10)
    assert wrong == []
    written = [f":1:client{index}-{r}" for index in range(CLIENTS) for r in range(10)]
    assert added.holds(written) > 0


@pytest.mark.parametrize("preload", [False, True], ids=["patched-first", "preloaded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gevent_workers_serve_more_requests_at_once_than_the_pools_hold(
    elasticache_cluster: LocalCluster, serve: Callable[..., Server], backend: str, preload: bool
) -> None:
    """
    A gevent worker runs every request in a greenlet of one thread, and requests wait for a
    client of the node's pool, which holds 2 here. Preloaded, the worker is forked from a
    master that used the cache before gevent patched ``threading`` in the worker.
    """
    options = ["--workers=1", "--worker-class=gevent", "--worker-connections=64"]
    server = serve(
        gunicorn(*options, *(["--preload"] if preload else [])),
        ELASTICACHE_WARM_AT_IMPORT="1",
        **cache_env(elasticache_cluster, backend, POOL_SIZE=2),
    )
    wrong, workers = round_trips(server, rounds=20)
    assert wrong == []
    assert len(workers) == 1
    assert server.stop() == 0
    assert survivors(sorted(workers)) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_preloaded_uvicorn_workers_of_gunicorn_serve_async_and_sync_views(
    elasticache_cluster: LocalCluster, serve: Callable[..., Server], backend: str
) -> None:
    """
    gunicorn with uvicorn's worker class, as ASGI deployments run it: each worker forked
    from a master that used the cache runs its own event loop.
    """
    server = serve(
        gunicorn(
            "--preload",
            "--workers=2",
            "--worker-class=uvicorn.workers.UvicornWorker",
            app="testproject.asgi:application",
        ),
        ELASTICACHE_WARM_AT_IMPORT="1",
        **cache_env(elasticache_cluster, backend),
    )
    assert server.get("/arecall/warmed-by").body == str(server.process.pid)
    wrong_async, workers = round_trips(server, rounds=20, remember="aremember", recall="arecall")
    wrong_mixed, _ = round_trips(server, rounds=20, remember="aremember", recall="recall")
    assert wrong_async == [] and wrong_mixed == []
    assert server.stop() == 0
    assert survivors(sorted(workers)) == []


@pytest.mark.parametrize("master", [True, False], ids=["master", "no-master"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uwsgi_workers_forked_from_the_process_that_loaded_the_application(
    elasticache_cluster: LocalCluster, serve: Callable[..., Server], backend: str, master: bool
) -> None:
    """
    uWSGI loads the application (which writes to the cache here) and then forks the workers
    itself, running none of Python's fork handlers: the package's handlers run from uWSGI's
    post-fork hook, with or without its master process.
    """
    before = connections_accepted(elasticache_cluster)
    server = serve(
        uwsgi(*(["--master"] if master else []), "--processes=2", f"--threads={THREADS}"),
        ELASTICACHE_WARM_AT_IMPORT="1",
        **cache_env(elasticache_cluster, backend),
    )
    assert server.get("/recall/warmed-by").body == str(server.process.pid)

    wrong, workers = round_trips(server, rounds=30)

    assert wrong == []
    assert len(workers) == 2
    assert server.stop() == (0 if master else UWSGI_END_CODE)
    if not master:  # Nothing stops the workers the first one forked: as a user would.
        for worker in workers - {server.process.pid}:
            os.kill(worker, signal.SIGTERM)
    assert survivors(sorted(workers)) == []
    opened = connections_accepted_since(before, elasticache_cluster)
    assert max(opened) <= most_connections(len(workers), backend), opened


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gevent_worker_while_one_request_waits_on_a_stopped_node(
    elasticache_cluster: LocalCluster, serve: Callable[..., Server], backend: str
) -> None:
    """
    One request of a gevent worker waits on a node that stopped answering; others ask the
    other nodes. pymemcache's sockets are gevent's, so they are answered during the wait.
    libmemcached waits in C, holding the worker's one thread: with the pylibmc backend they
    are answered only once the wait is over (README: the pymemcache backend under gevent).
    """
    wait = 20 if backend == "pymemcache" else 2  # Seconds a reply is waited for.
    timeout = (
        {"timeout": wait}
        if backend == "pymemcache"
        else {"behaviors": {"_poll_timeout": wait * 1000}}
    )
    server = serve(
        gunicorn("--workers=1", "--worker-class=gevent"),
        **cache_env(elasticache_cluster, backend, **timeout),
    )
    keys = [f"key-{index}" for index in range(30)]
    for key in keys:
        assert server.get(f"/remember/{key}?value={key}").status == 200
    stopped_node, *others = elasticache_cluster.nodes
    on_stopped = [key for key in keys if stopped_node.holds([f":1:{key}"])]
    mark, *elsewhere = [key for key in keys if key not in on_stopped]

    def reached() -> bool:
        command = f"get :1:{mark}\r\n".encode()
        return any(b"reached" in ask(node, command, b"END\r\n") for node in others)

    with ThreadPoolExecutor(1) as one, stopped(stopped_node):
        waiting = one.submit(server.get, f"/recall-after/{mark}/{on_stopped[0]}")
        eventually(reached, "the waiting request reached the cache")
        answers = [server.get(f"/recall/{key}") for key in elsewhere[:10]]
        answered_during_the_wait = not waiting.done()
    assert [answer.body for answer in answers] == elsewhere[:10]
    assert answered_during_the_wait is (backend == "pymemcache")
    # pymemcache's wait ended with the node's reply once it went on. pylibmc's timed out: an
    # error on libmemcached 1.1, a miss on the 1.0.16 that pylibmc's wheels bundle.
    waited = waiting.result()
    if backend == "pymemcache":
        assert (waited.status, waited.body) == (200, on_stopped[0])
    else:
        assert waited.status in (404, 500)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uvicorn_serves_async_and_sync_views_at_once(
    elasticache_cluster: LocalCluster, serve: Callable[..., Server], backend: str, loop: str
) -> None:
    """Async views await ``aset`` and ``aget``; a sync view reads the same keys in a thread."""
    server = serve(uvicorn(loop), **cache_env(elasticache_cluster, backend))
    wrong_async, _ = round_trips(server, rounds=20, remember="aremember", recall="arecall")
    wrong_mixed, _ = round_trips(server, rounds=20, remember="aremember", recall="recall")
    assert wrong_async == [] and wrong_mixed == []
    # uvicorn shuts down, then ends itself with the signal it was sent.
    assert server.stop() == -signal.SIGTERM
    assert "Finished server process" in server.log()
