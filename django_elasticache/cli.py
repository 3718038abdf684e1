"""
``python -m django_elasticache``: look at a cluster the way the backend does, or run a
local one for development.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import ssl
import sys
from collections.abc import Sequence
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
    discover_parser.add_argument("location", help="the configuration endpoint, HOST:PORT")
    discover_parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds for discovery and for each node check (default {DEFAULT_TIMEOUT:g})",
    )
    discover_parser.add_argument(
        "--tls", action="store_true", help="use TLS, verified against the system trust store"
    )
    discover_parser.add_argument(
        "--ca-file", help="use TLS, trusting the CA certificates in this PEM file"
    )
    discover_parser.set_defaults(run=run_discover)

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


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def timeout_seconds(text: str) -> float:
    """argparse type: seconds, within the bounds of the DISCOVERY_TIMEOUT option."""
    try:
        return check_seconds(float(text), MAX_DISCOVERY_TIMEOUT)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.ca_file:
        return ssl.create_default_context(cafile=args.ca_file)
    return system_tls_context() if args.tls else None


def run_discover(args: argparse.Namespace) -> int:
    """Print the config version and nodes; exit 1 if discovery fails or a node is silent."""
    try:
        tls = tls_context(args)
        endpoint = parse_location(args.location)
        config = discover(endpoint.host, endpoint.port, args.timeout, tls)
    except (OSError, InvalidCacheBackendError, ClusterDiscoveryError) as exc:
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


def start_local_cluster(nodes: int) -> LocalCluster | None:
    """A started LocalCluster, or None after saying on stderr why it cannot run."""
    from .testing import LocalCluster, MemcachedNotFound

    try:
        return LocalCluster(nodes=nodes).start()
    except MemcachedNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def run_local_cluster(args: argparse.Namespace) -> int:
    """Run a LocalCluster in the foreground until interrupted."""
    cluster = start_local_cluster(args.nodes)
    if cluster is None:
        return 1
    try:
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
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    finally:
        cluster.stop()
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """A Django round trip on a LocalCluster, showing which node holds how many keys."""
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
