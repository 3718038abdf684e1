"""The discovery protocol's parser, on replies given as bytes."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from django_elasticache.cluster_utils import (
    ClusterConfig,
    ClusterNode,
    format_address,
    is_serverless_host,
    parse_cluster_config,
    parse_engine_version,
)

AWS_NODES = (
    b"myCluster.pc4ldq.0001.use1.cache.amazonaws.com|10.82.235.120|11211 "
    b"myCluster.pc4ldq.0002.use1.cache.amazonaws.com|10.80.249.27|11211"
)
AWS_PAYLOAD = b"12\n" + AWS_NODES + b"\n"


def config_reply(payload: bytes, declared: int | None = None, legacy: bool = False) -> bytes:
    header = b"VALUE AmazonElastiCache:cluster" if legacy else b"CONFIG cluster"
    size = len(payload) if declared is None else declared
    return b"%s 0 %d\r\n%s\r\nEND\r\n" % (header, size, payload)


def test_aws_example_parses_to_both_nodes() -> None:
    assert len(AWS_PAYLOAD) == 136
    assert parse_cluster_config(config_reply(AWS_PAYLOAD)) == ClusterConfig(
        version=12,
        nodes=(
            ClusterNode("myCluster.pc4ldq.0001.use1.cache.amazonaws.com", "10.82.235.120", 11211),
            ClusterNode("myCluster.pc4ldq.0002.use1.cache.amazonaws.com", "10.80.249.27", 11211),
        ),
    )


def test_byte_count_as_printed_in_aws_documentation_is_accepted() -> None:
    config = parse_cluster_config(config_reply(AWS_PAYLOAD, declared=147))
    assert config.addresses == ("10.82.235.120:11211", "10.80.249.27:11211")


def test_legacy_value_form_parses_like_the_config_form() -> None:
    assert parse_cluster_config(config_reply(AWS_PAYLOAD, legacy=True)) == parse_cluster_config(
        config_reply(AWS_PAYLOAD)
    )


def test_node_without_ip_is_reached_by_hostname() -> None:
    config = parse_cluster_config(config_reply(b"3\nnode-1.example||11211\n"))
    assert config.addresses == ("node-1.example:11211",)


def test_ipv6_node_address_is_bracketed_for_the_client() -> None:
    config = parse_cluster_config(config_reply(b"3\nnode-1.example|2600:1f18::12|11211\n"))
    assert config.addresses == ("[2600:1f18::12]:11211",)


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (b"", "no header line"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "unexpected header"),
        (b"CONFIG cluster 0 5\r\n12\nh|1.2.3.4|1\n\r\n", "does not end with END"),
        (config_reply(b"twelve\nh|1.2.3.4|11211\n"), "config version is not a number"),
        (config_reply(b"12\nh|1.2.3.4\n"), "node is not hostname|ip|port"),
        (config_reply(b"12\nh|1.2.3.4|11211|x\n"), "node is not hostname|ip|port"),
        (config_reply(b"12\nh|1.2.3.4|http\n"), "node port is not in 1-65535"),
        (config_reply(b"12\nh|1.2.3.4|70000\n"), "node port is not in 1-65535"),
        (config_reply(b"12\n||11211\n"), "neither hostname nor ip"),
        (config_reply(b"12\n\n"), "node list is empty"),
        (config_reply(b"12\nh|1.2.3.4|11211"), "payload is not two newline-terminated lines"),
        (config_reply(b"12\nh|1.2.3.4|11211\nextra\n"), "two newline-terminated lines"),
        (config_reply(b"%d\nh|1.2.3.4|11211\n" % 2**63), "above 2**63 - 1"),
        (config_reply(b"1%s\nh|1.2.3.4|11211\n" % (b"0" * 5000)), "above 2**63 - 1"),
        (config_reply(b"12\nh|1.2.3.4|11211 h|1.2.3.5|11211\n"), "node listed twice: h|1.2.3.5"),
        (config_reply(b"12\na|1.2.3.4|11211 b|1.2.3.4|11211\n"), "node listed twice: b|1.2.3.4"),
        (config_reply(b"12\n" + b" ".join([b"h||1"] * 2) + b"\n"), "node listed twice"),
        (
            config_reply(b"12\n%s\n" % b" ".join(b"h%d||1" % i for i in range(1001))),
            "1001 nodes listed",
        ),
    ],
)
def test_malformed_reply_names_the_broken_part(reply: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_cluster_config(reply)


@pytest.mark.parametrize(
    ("line", "version"),
    [
        (b"VERSION 1.6.22", (1, 6, 22)),
        (b"VERSION 1.4.14 (Ubuntu)", (1, 4, 14)),
        (b"VERSION 1.4.34-1ubuntu1", (1, 4, 34)),
        (b"VERSION 1.4.5", (1, 4, 5)),
    ],
)
def test_engine_version_reads_the_leading_numbers(line: bytes, version: tuple) -> None:
    assert parse_engine_version(line) == version


@pytest.mark.parametrize("line", [b"ERROR", b"VERSION", b"VERSION one.two", b"version 1.6.2"])
def test_engine_version_rejects_other_lines(line: bytes) -> None:
    with pytest.raises(ValueError, match="not a memcached VERSION line"):
        parse_engine_version(line)


def test_largest_version_and_node_count_are_accepted() -> None:
    listed = b" ".join(b"h%d||11211" % index for index in range(1000))
    config = parse_cluster_config(config_reply(b"%d\n%s\n" % (2**63 - 1, listed)))
    assert config.version == 2**63 - 1 and len(config.nodes) == 1000


def test_same_hostname_on_other_ports_is_two_nodes() -> None:
    config = parse_cluster_config(config_reply(b"3\nlocalhost||11211 localhost||11212\n"))
    assert config.addresses == ("localhost:11211", "localhost:11212")


@pytest.mark.parametrize(
    ("host", "serverless"),
    [
        ("my-cache-abc123.serverless.use1.cache.amazonaws.com", True),
        ("MY-CACHE-ABC123.Serverless.euw2.cache.amazonaws.com", True),
        ("c.serverless.cnn1.cache.amazonaws.com.cn", True),
        ("my-cluster.abc123.cfg.use1.cache.amazonaws.com", False),
        ("serverless.use1.cache.amazonaws.com", False),
        ("my-cache.serverless.use1.cache.amazonaws.com.evil.example", False),
        ("127.0.0.1", False),
    ],
)
def test_serverless_endpoint_is_told_by_its_name(host: str, serverless: bool) -> None:
    assert is_serverless_host(host) is serverless


def test_format_address_brackets_only_ipv6() -> None:
    assert format_address("10.0.0.1", 11211) == "10.0.0.1:11211"
    assert format_address("::1", 11211) == "[::1]:11211"
    assert format_address("cfg.example", 11211) == "cfg.example:11211"


hostnames = st.from_regex(r"[a-z][a-z0-9.-]{0,40}", fullmatch=True)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda parts: ".".join(map(str, parts)))
nodes = st.lists(
    st.tuples(hostnames, st.one_of(st.just(""), ipv4), st.integers(1, 65535)),
    min_size=1,
    max_size=20,
    # A node is listed once: by hostname and port, and by the address connected to.
    unique_by=(lambda node: (node[0], node[2]), lambda node: (node[1] or node[0], node[2])),
)


@settings(max_examples=150, deadline=None)
@given(version=st.integers(0, 2**40), listed=nodes, legacy=st.booleans())
def test_any_well_formed_reply_round_trips(version: int, listed: list, legacy: bool) -> None:
    line = " ".join(f"{host}|{ip}|{port}" for host, ip, port in listed)
    config = parse_cluster_config(config_reply(f"{version}\n{line}\n".encode(), legacy=legacy))
    assert config.version == version
    assert config.nodes == tuple(ClusterNode(*node) for node in listed)


@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_mutated_replies_raise_only_value_error(data: st.DataObject) -> None:
    reply = bytearray(config_reply(AWS_PAYLOAD))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(reply) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            reply[position] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del reply[position]
        else:
            reply.insert(position, data.draw(st.sampled_from(b"|\n\r 0:")))
    try:
        config = parse_cluster_config(bytes(reply))
    except ValueError:
        return
    assert config.nodes and all(0 < node.port < 65536 for node in config.nodes)


@settings(max_examples=300, deadline=None)
@given(reply=st.binary(max_size=300))
def test_random_bytes_raise_only_value_error(reply: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_cluster_config(reply)
