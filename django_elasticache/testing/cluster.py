"""Real memcached processes, and a local ElastiCache-like cluster built from them.

The nodes are genuine memcached servers, so a cache backend talks to them exactly as it
would in production; only the configuration endpoint is emulated (see endpoint.py).
With ``tls=True`` the whole cluster speaks only TLS, with certificates from a throwaway
CA (see tls.py), like an ElastiCache cluster with in-transit encryption.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, TypedDict

from ..cluster_utils import format_address
from .endpoint import ConfigEndpoint, Node
from .lifecycle import Startable
from .processes import spawn
from .relay import Front, Relay, Rules, check_latency
from .serverless import ServerlessRules

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .tls import CertificateAuthority

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
LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
# New IPs tried for a replacement whose port is taken on the first ones.
REPLACEMENT_ATTEMPTS = 20
PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", flags=re.DOTALL
)

Certificate = tuple[str, str]  # (certificate PEM path, private key PEM path)


class NodeOptions(TypedDict, total=False):
    """How a memcached node is run, whatever puts it where."""

    hostname: str | None
    memory_mb: int
    memcached: str
    tls: Certificate | None


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


def check_memory_mb(memory_mb: object) -> int:
    """memcached's item memory (``-m``) in megabytes: a whole number, at least 1."""
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int):
        raise TypeError(f"memory_mb must be a whole number of megabytes, got {memory_mb!r}")
    if memory_mb < 1:
        raise ValueError(f"memory_mb must be a whole number of megabytes >= 1, got {memory_mb!r}")
    return memory_mb


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


def first_certificate_der(path: str) -> bytes:
    """The DER bytes of the first certificate in a PEM file: the one a server presents."""
    with open(path, encoding="ascii") as pem:
        match = PEM_CERTIFICATE.search(pem.read())
    if match is None:
        raise ValueError(f"no PEM certificate in {path}")
    return ssl.PEM_cert_to_DER_cert(match.group())


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


class MemcachedNode(Startable):
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
        self._memory_mb = check_memory_mb(memory_mb)
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
        return self._require_port()

    def _require_port(self) -> int:
        """The port memcached itself listens on."""
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
        with _connect(self._host, self._require_port(), self._probe_tls) as conn:
            conn.sendall(request)
            reply = _receive_until(conn, b"MN\r\n", max_reads=len(keys) + PROBE_READS)
        return reply.split(b"\r\n").count(b"HD")

    def __enter__(self) -> MemcachedNode:
        # start_memcached() hands out a running node, for use in a ``with`` block.
        return self if self.is_running else self.start()

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
        # memcached refuses to run as root unless told which user to be. Another user than
        # root would clear the request to die with this process (see processes.py).
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
        process = spawn(
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
    host: str = "127.0.0.1", port: int | None = None, **options: Unpack[NodeOptions]
) -> MemcachedNode:
    """Start a memcached server on a loopback host and return it once it is serving."""
    return MemcachedNode(host, port, **options).start()


class RelayedNode(MemcachedNode):
    """A memcached that clients reach through a relay front, as ElastiCache nodes are reached.

    memcached listens in plaintext on a private port of the same IP; the front listens on
    ``ip:port``, answers what its rules claim (the discovery commands, for a cluster
    node) and forwards the rest. With ``tls`` the front speaks TLS with that certificate.
    stop() closes the front and its connections first, so the address refuses like a
    dead node's; start() opens it again on the same port.
    """

    def __init__(
        self,
        relay: Relay,
        rules: Rules,
        host: str = "127.0.0.1",
        port: int | None = None,
        **options: Unpack[NodeOptions],
    ) -> None:
        # memcached itself listens in plaintext on a free port; the front takes both.
        self._certificate = options.pop("tls", None)
        super().__init__(host, **options)
        self._relay = relay
        self._rules = rules
        self._front_port = port
        self._front: Front | None = None

    @property
    def port(self) -> int:
        if self._front_port is None:
            raise RuntimeError("RelayedNode has not been started, so it has no port yet")
        return self._front_port

    @property
    def tls(self) -> Certificate | None:
        return self._certificate

    @property
    def is_running(self) -> bool:
        return self._front is not None and super().is_running

    def start(self) -> RelayedNode:
        super().start()
        try:
            self._front = self._relay.open(
                (self._host, self._front_port or 0),
                (self._host, self._require_port()),
                self._tls_context(),
                self._rules,
            )
        except OSError as exc:
            super().stop()
            where = format_address(self._host, self._front_port or 0)
            raise RuntimeError(f"the relay cannot listen on {where}: {exc}") from exc
        except BaseException:
            super().stop()
            raise
        self._front_port = self._front.address[1]
        return self

    def stop(self) -> None:
        if self._front is not None:
            self._relay.close(self._front)
            self._front = None
        super().stop()

    def _tls_context(self) -> ssl.SSLContext | None:
        """Read now, not at construction: the files may change before a restart()."""
        if self._certificate is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self._certificate)
        return context


class LoopbackAddresses:
    """IPv4 loopback addresses for a cluster's nodes: 127.A.B.1, 127.A.B.2, ...

    Each node gets its own address, so a replacement can keep the port and get a new IP,
    as on ElastiCache. A.B is random (A never 0, away from 127.0.0.1, 127.0.0.53 and
    127.0.1.1, which the system uses): clusters of concurrent test processes then use
    different addresses with near certainty, without coordinating, so an address one
    test watches going dead is not handed to another's node. A clash costs a retry only,
    since ports are per address.
    """

    def __init__(self, first: str | None = None) -> None:
        """``first``: where to start (tests); by default 127.A.B.1 with a random A.B."""
        if first is None:
            first = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.1"
        start = ipaddress.IPv4Address(first)
        self._addresses = (start + offset for offset in itertools.count())

    def next(self) -> str:
        """A loopback address this cluster has not handed out before."""
        for address in self._addresses:
            if address.packed[3] not in (0, 255):  # no network or broadcast lookalikes
                return str(address)
        raise AssertionError("unreachable: the address generator is endless")


def spreads_nodes(host: str, advertise_ip: bool) -> bool:
    """Whether nodes can each have their own IP: only on IPv4 loopback, with IPs advertised
    (without them, clients resolve "localhost", which is 127.0.0.1 alone), and where the
    system answers on all of 127.0.0.0/8 (Linux does; macOS has only 127.0.0.1 unless
    aliases are added, so there the nodes share the host and cannot be replaced)."""
    try:
        on_loopback = ipaddress.ip_address(host) in LOOPBACK_V4
    except ValueError:
        return False
    return advertise_ip and on_loopback and _whole_loopback_network()


@functools.cache
def _whole_loopback_network() -> bool:
    return _port_is_free("127.0.0.2", 0)


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class LocalCluster(Startable):
    """A memcached cluster on this machine that a discovery client cannot tell from
    ElastiCache: real memcached nodes behind an emulated configuration endpoint.

    Tests change the cluster the way ElastiCache does (add, remove or replace a node,
    each with a new config version) or break it the way a network does (kill a node,
    publish a stale config, make the endpoint misbehave).

    On an IPv4 loopback host each node has an IP of its own (see LoopbackAddresses), so
    replace_node() can do what ElastiCache does: same hostname, same port, new IP.

    With ``relay=True`` (the default) each node is reached through a relay that answers
    ``config get cluster`` (and the legacy ``get AmazonElastiCache:cluster``) with the
    current config, as every ElastiCache node does, reports the cluster's engine version
    to ``version``, and forwards every other command to its memcached. The relay costs a
    local hop per request; ``relay=False`` gives direct nodes, which answer discovery
    with ``ERROR`` like stock memcached (what benchmarks want).

    With ``tls=True``, nodes and endpoint accept only TLS, as with ElastiCache in-transit
    encryption: each node's certificate names its hostname (not its IP), the endpoint's
    names its host and "localhost", and all come from a throwaway CA that
    client_tls_context() trusts.

    ``serverless=True`` emulates ElastiCache Serverless instead: one TLS endpoint
    (``location``, also the single entry of ``nodes``) backed by one memcached, with no
    Auto Discovery and the service's refusals (see serverless.py). It has no nodes to
    add, remove or replace.

    ``latency`` (seconds, default 0) emulates a network such as a VPC's, where a round
    trip takes a few hundred microseconds instead of loopback's tens: the relay holds
    every reply of every node and of the configuration endpoint that long before the
    client gets it, in order and without holding up other connections, so each request
    and reply round trip takes ``latency`` longer. Requests are not delayed, nor are
    connecting and the TLS handshake with a node; the endpoint is then reached through
    the relay too (``location`` points at it), TLS handshake included. It needs the relay.

    ``memory_mb`` (default 16) is each node's item memory. memcached hands memory to each
    slab size a megabyte page at a time, so values of many sizes need more than their
    total: a test that stores megabytes of them needs more, or memcached evicts some.
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
        relay: bool = True,
        serverless: bool = False,
        latency: float = 0.0,
        memory_mb: int = 16,
    ) -> None:
        latency = check_latency(latency)
        if latency and not (relay or serverless):
            raise ValueError(f"latency={latency!r} is added by the relay, so it needs relay=True")
        if not advertise_ip and host != "127.0.0.1":
            raise ValueError(
                'advertise_ip=False advertises "localhost", so host must be 127.0.0.1'
            )
        self._initial_nodes = 1 if serverless else nodes
        self._host = host
        self._advertise_ip = advertise_ip
        self._addresses = LoopbackAddresses() if spreads_nodes(host, advertise_ip) else None
        self._cluster_name = cluster_name
        self._memcached = find_memcached(memcached)
        self._memory_mb = check_memory_mb(memory_mb)
        self._serverless = serverless
        # Made here rather than in start(): the endpoint needs its certificate now, and a
        # missing trustme should fail as early as a missing memcached.
        self._ca = _certificate_authority() if tls or serverless else None
        self._certificates: dict[str, Certificate] = {}
        server_tls = None
        if self._ca is not None and not serverless:
            server_tls = self._ca.server_context(_endpoint_names(host))
        self._endpoint = ConfigEndpoint(host, engine_version=engine_version, tls=server_tls)
        self._relay = None
        self._endpoint_front: Front | None = None
        if relay or serverless:
            self._relay = Relay(f"LocalCluster {cluster_name} relay", latency)
            # A cluster dropped without stop() must not leave its fronts listening.
            weakref.finalize(self, self._relay.stop)
        self._config_version = config_version
        self._nodes: list[MemcachedNode] = []
        self._started: list[MemcachedNode] = []
        self._next_index = 1

    # Lifecycle

    def start(self) -> LocalCluster:
        """Start the endpoint and the nodes, and publish the first config."""
        try:
            if self._relay is not None:
                self._relay.start()
            if self._serverless:
                self._nodes = [self._start_serverless_node()]
                return self
            self._endpoint.start()
            if self._relay is not None and self._relay.latency:
                self._endpoint_front = self._relay.open(
                    (self._host, 0), (self._host, self._endpoint.port), None, None
                )
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
        if self._relay is not None:
            self._relay.stop()
        if self._ca is not None:
            self._ca.stop()

    # What a client sees

    @property
    def endpoint(self) -> ConfigEndpoint:
        return self._endpoint

    @property
    def location(self) -> str:
        """The configuration endpoint as host:port, the value for Django's LOCATION."""
        if self._serverless:
            return self._nodes[0].address
        if self._endpoint_front is not None:
            return format_address(*self._endpoint_front.address)
        return self._endpoint.location

    @property
    def latency(self) -> float:
        """Seconds the relay adds to every round trip (see the class docstring)."""
        return 0.0 if self._relay is None else self._relay.latency

    @property
    def tls(self) -> bool:
        """Whether nodes and endpoint accept only TLS."""
        return self._ca is not None

    @property
    def serverless(self) -> bool:
        return self._serverless

    @property
    def relayed(self) -> bool:
        """Whether clients reach the nodes through a relay that answers discovery."""
        return self._relay is not None

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
        self._require_cluster("publish a config")
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
        self._require_cluster("add a node")
        node = self._start_node(self._next_hostname())
        self._republish([*self._nodes, node])
        return node

    def remove_node(self, node: MemcachedNode) -> None:
        self._require_cluster("remove a node")
        self._require_advertised(node)
        self._republish([other for other in self._nodes if other is not node])
        node.stop()

    def replace_node(self, node: MemcachedNode) -> MemcachedNode:
        """Swap in a new, empty memcached with the same hostname and port and a new IP.

        Needs an IPv4 loopback host with advertised IPs: IPv6 has one loopback address,
        and without IPs clients reach every node as "localhost" (127.0.0.1).
        """
        self._require_cluster("replace a node")
        self._require_advertised(node)
        replacement = self._start_replacement(node)
        self._republish([replacement if other is node else other for other in self._nodes])
        node.stop()
        return replacement

    # Outages that leave the config unchanged

    def kill_node(self, node: MemcachedNode) -> None:
        """Stop a node: its address refuses connections and its clients are cut off."""
        self._require_advertised(node)
        node.stop()

    def restart_node(self, node: MemcachedNode) -> None:
        """Bring a node back on its address, empty, as after a reboot."""
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

    def _start_node(
        self, hostname: str, ip: str | None = None, port: int | None = None
    ) -> MemcachedNode:
        if ip is None:
            ip = self._host if self._addresses is None else self._addresses.next()
        return self._launch(self._make_node(hostname, ip, port, self._endpoint))

    def _start_serverless_node(self) -> MemcachedNode:
        assert self._relay is not None and self._ca is not None
        certificate = self._ca.issue(_endpoint_names(self._host))
        node = RelayedNode(
            self._relay,
            ServerlessRules(),
            self._host,
            hostname=self._host,
            memory_mb=self._memory_mb,
            memcached=self._memcached,
            tls=certificate,
        )
        return self._launch(node)

    def _make_node(self, hostname: str, ip: str, port: int | None, rules: Rules) -> MemcachedNode:
        options = NodeOptions(
            hostname=hostname,
            memory_mb=self._memory_mb,
            memcached=self._memcached,
            tls=self._certificate(hostname),
        )
        if self._relay is None:
            return MemcachedNode(ip, port, **options)
        return RelayedNode(self._relay, rules, ip, port, **options)

    def _launch(self, node: MemcachedNode) -> MemcachedNode:
        self._started.append(node)
        return node.start()

    def _start_replacement(self, node: MemcachedNode) -> MemcachedNode:
        """Start a node on a fresh IP where the old node's port is free."""
        if self._addresses is None:
            raise RuntimeError(
                f"replace_node needs a new IP with the same port, and this cluster's nodes "
                f"share {self._host!r} (IPv6 has one loopback address; with "
                "advertise_ip=False clients reach every node as localhost; macOS answers "
                "only on 127.0.0.1): use an IPv4 loopback host with advertise_ip=True"
            )
        for _ in range(REPLACEMENT_ATTEMPTS):
            ip = self._addresses.next()
            if _port_is_free(ip, node.port):
                return self._start_node(node.hostname, ip, node.port)
        raise RuntimeError(
            f"port {node.port} was taken on {REPLACEMENT_ATTEMPTS} fresh loopback addresses"
        )

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

    def _require_cluster(self, action: str) -> None:
        if self._serverless:
            raise RuntimeError(f"a serverless cache has no nodes: cannot {action}")


def _certificate_authority() -> CertificateAuthority:
    """A new CA; imported only now, so that clusters without TLS do not need trustme."""
    from .tls import CertificateAuthority

    return CertificateAuthority()


def _endpoint_names(host: str) -> list[str]:
    """What the endpoint's certificate names: the host clients connect to, and localhost."""
    return [host] if host == "localhost" else [host, "localhost"]
