"""
``python -m django_elasticache``: look at a cluster the way the backend does, or run a
local one for development.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import ssl
import sys
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from django.core.cache.backends.base import InvalidCacheBackendError

from .cluster_utils import DEFAULT_TIMEOUT, ClusterDiscoveryError, ask_version, discover
from .options import MAX_DISCOVERY_TIMEOUT, check_seconds, parse_location, system_tls_context

if TYPE_CHECKING:
    from .testing import LocalCluster


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m django_elasticache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    discover_parser = commands.add_parser(
        "discover", help="ask a configuration endpoint for its nodes and check each node"
    )
    add_cluster_arguments(discover_parser)
    discover_parser.set_defaults(run=run_discover)

    status_parser = commands.add_parser(
        "status",
        help="every node's engine, uptime, items, memory and hit ratio; exit 0 healthy, "
        "1 some node down, 2 unreachable",
    )
    add_cluster_arguments(status_parser)
    status_parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    status_parser.set_defaults(run=run_status)

    cluster_parser = commands.add_parser(
        "local-cluster", help="run memcached nodes and a configuration endpoint on 127.0.0.1"
    )
    cluster_parser.add_argument("--nodes", type=positive, default=3, help="how many (default 3)")
    cluster_parser.set_defaults(run=run_local_cluster)

    demo_parser = commands.add_parser(
        "demo", help="start a local cluster and show Django's cache spreading keys over it"
    )
    demo_parser.add_argument("--nodes", type=positive, default=3, help="how many (default 3)")
    demo_parser.add_argument("--keys", type=positive, default=1000, help="how many (default 1000)")
    demo_parser.set_defaults(run=run_demo)

    args = parser.parse_args(argv)
    return args.run(args)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The endpoint and how to reach it, for every command that asks a real cluster."""
    parser.add_argument("location", help="the configuration endpoint, HOST:PORT")
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds for discovery and for each node (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--tls", action="store_true", help="use TLS, verified against the system trust store"
    )
    parser.add_argument("--ca-file", help="use TLS, trusting the CA certificates in this PEM file")


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive whole number, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def timeout_seconds(text: str) -> float:
    """argparse type: seconds, within the bounds of the DISCOVERY_TIMEOUT option."""
    try:
        return check_seconds(float(text), MAX_DISCOVERY_TIMEOUT)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds above 0 and at most "
            f"{MAX_DISCOVERY_TIMEOUT:g}, such as 2 or 0.5, got {text!r}"
        ) from None


class CAFileError(Exception):
    """The --ca-file could not be read as PEM CA certificates."""


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.ca_file:
        try:
            return ssl.create_default_context(cafile=args.ca_file)
        except OSError as exc:  # missing, unreadable, or no certificate in it
            reason = exc.strerror or str(exc)
            raise CAFileError(f"cannot use CA file {args.ca_file!r}: {reason}") from None
    return system_tls_context() if args.tls else None


def run_discover(args: argparse.Namespace) -> int:
    """Print the config version and nodes; exit 1 if discovery fails or a node is silent."""
    try:
        tls = tls_context(args)
        endpoint = parse_location(args.location)
        config = discover(endpoint.host, endpoint.port, args.timeout, tls)
    except (CAFileError, OSError, InvalidCacheBackendError, ClusterDiscoveryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"config version {config.version}, {len(config.nodes)} nodes")
    silent = 0
    for node in config.nodes:
        try:
            version = ask_version(
                node.ip or node.hostname, node.port, args.timeout, tls, node.hostname or node.ip
            )
            state = f"memcached {version}"
        except ClusterDiscoveryError as exc:
            silent += 1
            state = f"NOT ANSWERING ({exc.problem})"
        print(f"  {node.address:<24} {node.hostname:<48} {state}")
    if silent:
        print(f"error: {silent} of {len(config.nodes)} nodes did not answer", file=sys.stderr)
        return 1
    return 0


def run_status(args: argparse.Namespace) -> int:
    """``manage.py elasticache`` for a bare LOCATION, without a Django project."""
    from .health import Status, check_endpoint, format_report
    from .options import BackendOptions

    try:
        endpoint = parse_location(args.location)
        health = check_endpoint(endpoint, BackendOptions(tls=tls_context(args)), args.timeout)
    except (OSError, InvalidCacheBackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return Status.UNREACHABLE
    print(json.dumps(health.as_dict(), indent=2) if args.json else format_report(health))
    return health.status


# What ends a foreground process: Ctrl+C, kill, a closed terminal or ssh session, Ctrl+\\.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Stopped(Exception):
    """A stop signal arrived; raised where the program was, so ``finally`` blocks run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    # Further signals must not interrupt the cleanup this one starts.
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn every stop signal into ``Stopped``, so a cluster is stopped, not orphaned."""
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_local_cluster(nodes: int) -> LocalCluster | None:
    """A started LocalCluster, or None after saying on stderr why it cannot run."""
    from .testing import LocalCluster, MemcachedNotFound

    try:
        return LocalCluster(nodes=nodes).start()
    except MemcachedNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def run_local_cluster(args: argparse.Namespace) -> int:
    """Run a LocalCluster in the foreground until a stop signal; exit 0 then."""
    with contextlib.suppress(Stopped), stop_on_signals():
        cluster = start_local_cluster(args.nodes)
        if cluster is None:
            return 1
        try:
            print_settings(cluster)
            while True:
                signal.pause()
        finally:
            cluster.stop()
    return 0


def print_settings(cluster: LocalCluster) -> None:
    print(f"configuration endpoint: {cluster.location}")
    for node in cluster.nodes:
        print(f"  node {node.address}  ({node.hostname})")
    print("\nIn settings.py:\n")
    print("CACHES = {")
    print('    "default": {')
    print('        "BACKEND": "django_elasticache.memcached.ElastiCache",')
    print(f'        "LOCATION": "{cluster.location}",')
    print("    }")
    print("}\n\nPress Ctrl+C to stop.", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    """A Django round trip on a LocalCluster; a stop signal ends it with 128 + its number."""
    try:
        with stop_on_signals():
            return demo_round_trip(args)
    except Stopped as stopped:
        print(f"stopped by {stopped}", file=sys.stderr)
        return 128 + stopped.signum


def demo_round_trip(args: argparse.Namespace) -> int:
    """Set and read back keys through Django's cache; show which node holds how many."""
    import django
    from django.conf import settings

    cluster = start_local_cluster(args.nodes)
    if cluster is None:
        return 1
    try:
        settings.configure(
            CACHES={
                "default": {
                    "BACKEND": "django_elasticache.memcached.ElastiCache",
                    "LOCATION": cluster.location,
                }
            }
        )
        django.setup()
        from django.core.cache import cache

        print(f"LOCATION {cluster.location}: discovered {', '.join(cache.client_servers)}")
        keys = [f"demo-{index}" for index in range(args.keys)]
        values = {key: key.upper() for key in keys}
        cache.set_many(values)
        intact = cache.get_many(keys) == values
        print(f"set {len(keys)} keys through Django's cache; all read back intact: {intact}")
        held = cluster.keys_per_node([cache.make_key(key) for key in keys])
        for address, count in held.items():
            print(f"  {address:<22} holds {count:>5} keys")
        return 0 if intact and all(held.values()) else 1
    finally:
        cluster.stop()
