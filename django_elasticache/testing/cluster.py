"""Real memcached processes, and a local ElastiCache-like cluster built from them.

The nodes are genuine memcached servers, so a cache backend talks to them exactly as it
would in production; only the configuration endpoint is emulated (see endpoint.py).
With ``tls=True`` the whole cluster speaks only TLS, with certificates from a throwaway
CA (see tls.py), like an ElastiCache cluster with in-transit encryption.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import IO

from ..cluster_utils import format_address
from .endpoint import ConfigEndpoint, Node
from .tls import Certificate, CertificateAuthority, first_certificate_der

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# A free port can be taken by another process between our probe and memcached's bind.
FREE_PORT_ATTEMPTS = 5
# A fixed port (a restart) may still be held briefly by a dying process.
BUSY_PORT_TIMEOUT = 3.0
POLL_INTERVAL = 0.02
PROBE_TIMEOUT = 0.5
PROBE_READS = 16  # memcached's stats reply is about 2 KB
PORT_BUSY = "Address already in use"


class MemcachedNotFound(RuntimeError):
    """The memcached executable is missing, so no local node can be started."""

    def __init__(self, memcached: str) -> None:
        super().__init__(
            f"memcached executable {memcached!r} not found. Install memcached "
            "(Debian/Ubuntu: `apt-get install memcached`, macOS: `brew install memcached`) "
            "or pass the path of the binary."
        )


class _PortBusy(Exception):
    """memcached could not bind its port; the caller decides whether to try again."""


def find_memcached(memcached: str = "memcached") -> str:
    """Resolve a command name or path to the memcached executable."""
    path = shutil.which(memcached)
    if path is None:
        raise MemcachedNotFound(memcached)
    return path


def _free_port(host: str) -> int:
    """Ask the kernel for a port that is free on host right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _serves(host: str, port: int, pid: int, tls: _PinnedTLS | None = None) -> bool:
    """Tell whether the memcached with this pid accepts connections on host:port.

    It must answer ``version``, and its ``stats`` must show our pid: another server may
    take a free port before ours binds it, and must not pass for ours. With TLS, it must
    also present our certificate, which shows memcached loaded the files we gave it.
    """
    try:
        with _connect(host, port, tls) as conn:
            conn.sendall(b"version\r\nstats\r\n")
            reply = _receive_until(conn, b"\r\nEND\r\n")
    except OSError:  # ssl.SSLError included
        return False
    return reply.startswith(b"VERSION ") and b"\r\nSTAT pid %d\r\n" % pid in reply


class _PinnedTLS:
    """Client-side TLS for our own probes: trust exactly the certificate a node was given.

    The node has no CA to verify against (it may be given any certificate), and the probe
    connects to an IP while the certificate names a hostname; so instead of a chain and
    a hostname, the probe checks that the server presents the very certificate it got.
    """

    def __init__(self, certificate_file: str) -> None:
        self.certificate = first_certificate_der(certificate_file)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE  # replaced by the comparison in wrap()

    def wrap(self, conn: socket.socket) -> ssl.SSLSocket:
        wrapped = self.context.wrap_socket(conn)
        if wrapped.getpeercert(binary_form=True) != self.certificate:
            wrapped.close()
            raise ssl.SSLError("the server presented another certificate than its own")
        return wrapped


def _connect(host: str, port: int, tls: _PinnedTLS | None) -> socket.socket:
    """Connect within PROBE_TIMEOUT, and complete the TLS handshake if the node uses TLS."""
    conn = socket.create_connection((host, port), timeout=PROBE_TIMEOUT)
    if tls is None:
        return conn
    try:
        return tls.wrap(conn)
    except BaseException:
        conn.close()
        raise


def _receive_until(conn: socket.socket, terminator: bytes, max_reads: int = PROBE_READS) -> bytes:
    reply = b""
    for _ in range(max_reads):
        chunk = conn.recv(4096)
        reply += chunk
        if not chunk or reply.endswith(terminator):
            break
    return reply


def _terminate(process: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
    """End a memcached process at once.

    SIGKILL rather than SIGTERM: memcached acts on SIGTERM only at its next one-second
    clock tick, and it keeps nothing on disk that a graceful exit would save.
    """
    process.kill()
    process.wait(STOP_TIMEOUT)
    stderr.close()


class MemcachedNode:
    """One memcached server process in the foreground, owned by this Python process.

    ``hostname`` is the name a cluster config advertises for it; ``ip`` and ``port`` are
    where it really listens. The process lives no longer than this object: it is ended by
    stop(), by the context manager, when the object is garbage collected, or at the
    latest when the interpreter exits.

    ``tls`` is a (certificate chain, private key) pair of PEM files: memcached then
    accepts only TLS connections and presents that certificate.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        hostname: str | None = None,
        memory_mb: int = 16,
        memcached: str = "memcached",
        tls: Certificate | None = None,
    ) -> None:
        self._executable = find_memcached(memcached)
        self._host = host
        self._port = port
        self._hostname = hostname or host
        self._memory_mb = memory_mb
        if tls is not None and any("," in path for path in tls):
            # memcached splits its -o option list at commas.
            raise ValueError(f"memcached cannot take TLS file paths with a comma: {tls!r}")
        self._tls = tls
        self._probe_tls: _PinnedTLS | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def hostname(self) -> str:
        return self._hostname

    @property
    def ip(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("MemcachedNode has not been started, so it has no port yet")
        return self._port

    @property
    def address(self) -> str:
        """Where to reach the server, as pylibmc and Django's LOCATION accept it."""
        return format_address(self._host, self.port)

    @property
    def tls(self) -> Certificate | None:
        """The (certificate, key) files memcached serves TLS with, or None for plaintext."""
        return self._tls

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> MemcachedNode:
        """Launch memcached and return once it answers ``version``.

        Without a port, a free one is picked, and another one if it was taken meanwhile.
        A fixed port is retried for a short while, because a process that just released
        it may not have exited yet.
        """
        if self.is_running:
            raise RuntimeError(f"memcached is already running at {self.address}")
        if self._port is None:
            self._start_on_free_port()
        else:
            self._start_on_fixed_port(self._port)
        return self

    def stop(self) -> None:
        """Kill the process and reap it (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()

    def restart(self) -> MemcachedNode:
        """Stop, then start a fresh, empty memcached on the same port."""
        self.stop()
        return self.start()

    def holds(self, keys: Sequence[str]) -> int:
        """
        How many of these memcached keys this node stores, asked with meta no-op gets
        (``mg <key>`` answers ``HD`` or ``EN``), so tests and the demo can see where a
        client put its keys without a client library of their own.
        """
        request = b"".join(b"mg %s\r\n" % key.encode() for key in keys) + b"mn\r\n"
        with _connect(self.ip, self.port, self._probe_tls) as conn:
            conn.sendall(request)
            reply = _receive_until(conn, b"MN\r\n", max_reads=len(keys) + PROBE_READS)
        return reply.split(b"\r\n").count(b"HD")

    def __enter__(self) -> MemcachedNode:
        return self if self.is_running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.address if self._port is not None else self._host
        return f"<MemcachedNode {self._hostname} {where} pid={self.pid}>"

    def _start_on_free_port(self) -> None:
        for _ in range(FREE_PORT_ATTEMPTS):
            try:
                self._launch(_free_port(self._host))
                return
            except _PortBusy:
                continue
        raise RuntimeError(
            f"memcached found no free port on {self._host} in {FREE_PORT_ATTEMPTS} attempts"
        )

    def _start_on_fixed_port(self, port: int) -> None:
        deadline = time.monotonic() + BUSY_PORT_TIMEOUT
        for _ in range(int(BUSY_PORT_TIMEOUT / POLL_INTERVAL) + 1):
            try:
                self._launch(port)
                return
            except _PortBusy as busy:
                reason = str(busy)
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
        where = format_address(self._host, port)
        raise RuntimeError(f"memcached could not listen on {where}: {reason}")

    def _command(self, port: int) -> list[str]:
        command = [self._executable, "-l", self._host, "-p", str(port), "-U", "0"]
        command += ["-m", str(self._memory_mb), "-t", "1"]
        if self._tls is not None:
            certificate, key = self._tls
            command += ["-Z", "-o", f"ssl_chain_cert={certificate},ssl_key={key}"]
        # memcached refuses to run as root unless told which user to be.
        if os.geteuid() == 0:
            command += ["-u", "root"]
        return command

    def _launch(self, port: int) -> None:
        """Run memcached on port and wait until it serves; raise _PortBusy if it cannot bind.

        stderr goes to a temporary file rather than a pipe: nobody reads it while the
        server runs, and a full pipe would block the process.
        """
        # Closed by the finalizer, together with the process that writes to it.
        stderr = tempfile.TemporaryFile()  # noqa: SIM115
        process = subprocess.Popen(
            self._command(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
        finalizer = weakref.finalize(self, _terminate, process, stderr)
        try:
            # Read now, not at construction: the files may change before a restart().
            tls = None if self._tls is None else _PinnedTLS(self._tls[0])
            self._wait_until_ready(process, stderr, port, tls)
        except BaseException:
            finalizer()
            raise
        self._process, self._port, self._finalizer = process, port, finalizer
        self._probe_tls = tls

    def _wait_until_ready(
        self,
        process: subprocess.Popen[bytes],
        stderr: IO[bytes],
        port: int,
        tls: _PinnedTLS | None,
    ) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                message = _read(stderr)
                if PORT_BUSY in message:
                    raise _PortBusy(message)
                raise RuntimeError(f"memcached exited with status {process.returncode}: {message}")
            if _serves(self._host, port, process.pid, tls):
                return
            time.sleep(POLL_INTERVAL)
        raise RuntimeError(
            f"memcached did not answer on {format_address(self._host, port)} "
            f"within {READY_TIMEOUT} s: {_read(stderr)}"
        )


def _read(stream: IO[bytes]) -> str:
    stream.seek(0)
    return stream.read().decode("utf-8", "replace").strip()


def start_memcached(
    host: str = "127.0.0.1",
    port: int | None = None,
    memory_mb: int = 16,
    *,
    hostname: str | None = None,
    memcached: str = "memcached",
    tls: Certificate | None = None,
) -> MemcachedNode:
    """Start a memcached server on a loopback host and return it once it is serving."""
    node = MemcachedNode(
        host, port, hostname=hostname, memory_mb=memory_mb, memcached=memcached, tls=tls
    )
    return node.start()


class LocalCluster:
    """A memcached cluster on this machine that a discovery client cannot tell from
    ElastiCache: real memcached nodes behind an emulated configuration endpoint.

    Tests change the cluster the way ElastiCache does (add, remove or replace a node,
    each with a new config version) or break it the way a network does (kill a node,
    publish a stale config, make the endpoint misbehave).

    With ``tls=True``, nodes and endpoint accept only TLS, as with ElastiCache in-transit
    encryption: each node's certificate names its hostname (not its IP), the endpoint's
    names its host and "localhost", and all come from a throwaway CA that
    client_tls_context() trusts.
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        engine_version: str = "1.6.18",
        config_version: int = 1,
        host: str = "127.0.0.1",
        advertise_ip: bool = True,
        cluster_name: str = "local",
        memcached: str = "memcached",
        tls: bool = False,
        openssl: str = "openssl",
    ) -> None:
        if not advertise_ip and host != "127.0.0.1":
            raise ValueError(
                'advertise_ip=False advertises "localhost", so host must be 127.0.0.1'
            )
        self._initial_nodes = nodes
        self._host = host
        self._advertise_ip = advertise_ip
        self._cluster_name = cluster_name
        self._memcached = find_memcached(memcached)
        # Made here rather than in start(): the endpoint needs its certificate now, and a
        # missing openssl should fail as early as a missing memcached.
        self._ca = CertificateAuthority(openssl=openssl) if tls else None
        self._certificates: dict[str, Certificate] = {}
        server_tls = None if self._ca is None else self._ca.server_context(_endpoint_names(host))
        self._endpoint = ConfigEndpoint(host, engine_version=engine_version, tls=server_tls)
        self._config_version = config_version
        self._nodes: list[MemcachedNode] = []
        self._started: list[MemcachedNode] = []
        self._next_index = 1

    # Lifecycle

    def start(self) -> LocalCluster:
        """Start the endpoint and the nodes, and publish the first config."""
        try:
            self._endpoint.start()
            nodes = [self._start_node(self._next_hostname()) for _ in range(self._initial_nodes)]
            self.publish(nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the endpoint and every memcached this cluster ever started (idempotent).

        With TLS, also remove the CA's directory, private keys included.
        """
        self._endpoint.stop()
        for node in self._started:
            node.stop()
        if self._ca is not None:
            self._ca.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # What a client sees

    @property
    def endpoint(self) -> ConfigEndpoint:
        return self._endpoint

    @property
    def location(self) -> str:
        """The configuration endpoint as host:port, the value for Django's LOCATION."""
        return self._endpoint.location

    @property
    def tls(self) -> bool:
        """Whether nodes and endpoint accept only TLS."""
        return self._ca is not None

    @property
    def certificate_authority(self) -> CertificateAuthority | None:
        """The CA of every certificate of this cluster, or None without TLS."""
        return self._ca

    def client_tls_context(self) -> ssl.SSLContext:
        """A client context that trusts this cluster's CA and checks hostnames.

        Connect to a node's IP with ``server_hostname=node.hostname``, and to the endpoint
        with ``server_hostname=cluster.endpoint.host``.
        """
        if self._ca is None:
            raise RuntimeError("this LocalCluster does not use TLS; create it with tls=True")
        return self._ca.client_context()

    @property
    def nodes(self) -> list[MemcachedNode]:
        """The advertised nodes, in the order the config lists them."""
        return list(self._nodes)

    @property
    def node_addresses(self) -> list[str]:
        return [node.address for node in self._nodes]

    @property
    def config_version(self) -> int:
        return self._config_version

    @property
    def engine_version(self) -> str:
        return self._endpoint.engine_version

    @engine_version.setter
    def engine_version(self, version: str) -> None:
        self._endpoint.engine_version = version

    def publish(
        self, nodes: Sequence[MemcachedNode] | None = None, version: int | None = None
    ) -> None:
        """Advertise nodes under a config version (defaults: the current ones).

        Neither is checked, so a test can publish a stale version or a dead node.
        """
        if nodes is not None:
            self._nodes = sorted(nodes, key=lambda node: node.hostname)
        if version is not None:
            self._config_version = version
        self._endpoint.publish(
            [self._advertised(node) for node in self._nodes], self._config_version
        )

    def keys_per_node(self, keys: Sequence[str]) -> dict[str, int]:
        """How many of these memcached keys each advertised node holds, by address."""
        return {node.address: node.holds(keys) for node in self._nodes}

    # Topology changes, each published under the next config version

    def add_node(self) -> MemcachedNode:
        node = self._start_node(self._next_hostname())
        self._republish([*self._nodes, node])
        return node

    def remove_node(self, node: MemcachedNode) -> None:
        self._require_advertised(node)
        self._republish([other for other in self._nodes if other is not node])
        node.stop()

    def replace_node(self, node: MemcachedNode) -> MemcachedNode:
        """Swap in a new, empty memcached on a new port under the same hostname."""
        self._require_advertised(node)
        replacement = self._start_node(node.hostname)
        self._republish([replacement if other is node else other for other in self._nodes])
        node.stop()
        return replacement

    # Outages that leave the config unchanged

    def kill_node(self, node: MemcachedNode) -> None:
        self._require_advertised(node)
        node.stop()

    def restart_node(self, node: MemcachedNode) -> None:
        """Bring a node back on its port, empty, as after a reboot."""
        self._require_advertised(node)
        node.restart()

    # Helpers

    def _republish(self, nodes: list[MemcachedNode]) -> None:
        self.publish(nodes, self._config_version + 1)

    def _advertised(self, node: MemcachedNode) -> Node:
        return (node.hostname, node.ip if self._advertise_ip else "", node.port)

    def _next_hostname(self) -> str:
        index, self._next_index = self._next_index, self._next_index + 1
        if not self._advertise_ip:
            return "localhost"
        return f"{self._cluster_name}.abc123.{index:04d}.cache.local"

    def _start_node(self, hostname: str) -> MemcachedNode:
        node = MemcachedNode(
            self._host,
            hostname=hostname,
            memcached=self._memcached,
            tls=self._certificate(hostname),
        )
        self._started.append(node)
        return node.start()

    def _certificate(self, hostname: str) -> Certificate | None:
        """The certificate for a hostname, issued once: a replacement node reuses it."""
        if self._ca is None:
            return None
        if hostname not in self._certificates:
            self._certificates[hostname] = self._ca.issue([hostname])
        return self._certificates[hostname]

    def _require_advertised(self, node: MemcachedNode) -> None:
        if not any(node is advertised for advertised in self._nodes):
            raise ValueError(f"{node!r} is not an advertised node of this cluster")


def _endpoint_names(host: str) -> list[str]:
    """What the endpoint's certificate names: the host clients connect to, and localhost."""
    return [host] if host == "localhost" else [host, "localhost"]
