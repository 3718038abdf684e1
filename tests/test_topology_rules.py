"""
The topology's rules, with a fake clock and a fake discovery: exact times, no network.

Background work runs inline (the runner calls it at once), so a refresh started by a
request has finished when ``current()`` returns, and the next call shows its outcome.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable

import pytest
from support import Interrupted

from django_elasticache import topology
from django_elasticache.cluster_utils import (
    ClusterConfig,
    ClusterDiscoveryError,
    ClusterNode,
    DiscoveryNotSupported,
    EndpointTimeout,
    EndpointTLSError,
    EndpointUnreachable,
    WrongProtocolData,
)
from django_elasticache.options import BackendOptions, Endpoint
from django_elasticache.topology import ClusterTopology, DiscoveryPending

ENDPOINT = Endpoint("cfg.example", 11211)
INTERVAL = 60.0


def nodes(*names: str) -> tuple[ClusterNode, ...]:
    return tuple(
        ClusterNode(f"{name}.example", f"10.0.0.{index}", 11211)
        for index, name in enumerate(names, 1)
    )


THREE = nodes("a", "b", "c")
FOUR = nodes("a", "b", "c", "d")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Servers:
    """
    What each server answers to discovery: a config or an error, by host. ``during`` runs
    inside the discovery (to let time pass or to block), like a slow endpoint.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.answers: dict[str, ClusterConfig | ClusterDiscoveryError] = {}
        self.asked: list[tuple[str, str | None]] = []
        self.during: Callable[[], None] = lambda: None

    def __call__(
        self,
        host: str,
        port: int,
        timeout: float,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> ClusterConfig:
        self.asked.append((host, server_hostname))
        self.during()
        answer = self.answers.get(host, EndpointUnreachable(host, "connection refused"))
        if isinstance(answer, ClusterDiscoveryError):
            raise answer
        return answer

    def endpoint_answers(self, answer: ClusterConfig | ClusterDiscoveryError) -> None:
        self.answers[ENDPOINT.host] = answer

    @property
    def endpoint_asked(self) -> int:
        return sum(host == ENDPOINT.host for host, _ in self.asked)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def servers(clock: Clock) -> Servers:
    servers = Servers(clock)
    servers.endpoint_answers(ClusterConfig(5, THREE))
    return servers


@pytest.fixture
def make(clock: Clock, servers: Servers) -> Callable[..., ClusterTopology]:
    def make(endpoint: Endpoint = ENDPOINT, **options) -> ClusterTopology:
        options.setdefault("refresh_interval", INTERVAL)
        return ClusterTopology(
            endpoint,
            BackendOptions(**options).discovery_settings,
            clock=clock,
            discover=servers,
            run_in_background=lambda work, name: work(),
        )

    return make


def due(topology: ClusterTopology, clock: Clock) -> ClusterConfig:
    """Let a full interval pass, then make the request that starts (and here ends) a refresh."""
    clock.advance(INTERVAL)
    topology.current()
    return topology.current()


# Refresh timing


def test_refresh_comes_within_the_last_tenth_of_the_interval(make, clock, servers) -> None:
    first_refresh = []
    for _ in range(40):
        clock.now = 1000.0
        cluster = make()
        cluster.current()
        asked = servers.endpoint_asked
        waited = 0.0
        while servers.endpoint_asked == asked:
            clock.advance(0.5)
            waited += 0.5
            cluster.current()
        first_refresh.append(waited)
    assert all(0.9 * INTERVAL <= waited <= INTERVAL for waited in first_refresh)
    assert len(set(first_refresh)) > 1, "no jitter: a fleet would poll in step"


def test_no_refresh_without_an_interval(make, clock, servers) -> None:
    cluster = make(refresh_interval=None)
    cluster.current()
    clock.advance(10 * INTERVAL)
    cluster.refresh_soon()
    cluster.current()
    assert servers.endpoint_asked == 1


def test_node_errors_bring_refreshes_forward_spaced(make, clock, servers) -> None:
    cluster = make()
    cluster.current()
    cluster.refresh_soon()
    cluster.refresh_soon()
    assert servers.endpoint_asked == 2
    clock.advance(topology.ERROR_REFRESH_SPACING - 0.1)
    cluster.refresh_soon()
    assert servers.endpoint_asked == 2
    clock.advance(0.1)
    cluster.refresh_soon()
    assert servers.endpoint_asked == 3


def test_refresh_soon_before_any_list_asks_nothing(make, servers) -> None:
    make().refresh_soon()
    assert servers.endpoint_asked == 0


# Taking a refreshed list


def test_higher_version_replaces_the_list_with_a_new_object(make, clock, servers) -> None:
    cluster = make()
    first = cluster.current()
    servers.endpoint_answers(ClusterConfig(6, FOUR))
    assert due(cluster, clock).nodes == FOUR
    assert cluster.current() is not first


def test_unchanged_list_keeps_the_object(make, clock, servers) -> None:
    cluster = make()
    first = cluster.current()
    servers.endpoint_answers(ClusterConfig(9, THREE))
    assert due(cluster, clock) is first


def test_one_lower_version_is_ignored(make, clock, servers, caplog) -> None:
    cluster = make()
    first = cluster.current()
    servers.endpoint_answers(ClusterConfig(4, FOUR))
    with caplog.at_level(logging.WARNING, logger="django_elasticache"):
        assert due(cluster, clock) is first
    assert "Ignoring stale node list" in caplog.text


def test_lower_version_in_every_reply_for_a_while_is_taken(make, clock, servers, caplog) -> None:
    """A cluster deleted and re-created under its name starts again at version 1."""
    cluster = make()
    cluster.current()
    servers.endpoint_answers(ClusterConfig(1, FOUR))
    for _ in range(topology.STALE_REPLIES_TO_ACCEPT - 1):
        assert due(cluster, clock).nodes == THREE
    with caplog.at_level(logging.WARNING, logger="django_elasticache"):
        assert due(cluster, clock) == ClusterConfig(1, FOUR)
    assert "went back from 5 to 1" in caplog.text
    servers.endpoint_answers(ClusterConfig(2, THREE))
    assert due(cluster, clock) == ClusterConfig(2, THREE)


def test_stale_replies_must_span_the_whole_delay(make, clock, servers, monkeypatch) -> None:
    """Error-driven refreshes can come fast; a lagging node must not win by numbers alone."""
    monkeypatch.setattr(topology, "ERROR_REFRESH_SPACING", 1.0)
    cluster = make()
    cluster.current()
    servers.endpoint_answers(ClusterConfig(1, FOUR))
    for _ in range(int(topology.STALE_SECONDS_TO_ACCEPT)):
        cluster.refresh_soon()
        assert cluster.current().nodes == THREE
        clock.advance(1.0)
    cluster.refresh_soon()
    assert cluster.current().nodes == FOUR


def test_a_confirmation_breaks_the_stale_run(make, clock, servers) -> None:
    cluster = make()
    cluster.current()
    servers.endpoint_answers(ClusterConfig(1, FOUR))
    due(cluster, clock)
    due(cluster, clock)
    servers.endpoint_answers(ClusterConfig(5, THREE))
    due(cluster, clock)
    servers.endpoint_answers(ClusterConfig(1, FOUR))
    for _ in range(topology.STALE_REPLIES_TO_ACCEPT - 1):
        assert due(cluster, clock).nodes == THREE


def test_failed_refresh_keeps_the_list_and_says_so(make, clock, servers, caplog) -> None:
    cluster = make()
    first = cluster.current()
    servers.endpoint_answers(WrongProtocolData(ENDPOINT.host, "garbage"))
    with caplog.at_level(logging.WARNING, logger="django_elasticache"):
        assert due(cluster, clock) is first
    assert "keeping config version 5" in caplog.text


# Endpoint outage: the known nodes are asked


@pytest.mark.parametrize(
    "outage", [EndpointUnreachable("cfg", "refused"), EndpointTimeout("cfg", "timed out")]
)
def test_endpoint_outage_asks_the_known_nodes(make, clock, servers, outage) -> None:
    cluster = make()
    cluster.current()
    servers.endpoint_answers(outage)
    servers.answers["10.0.0.2"] = ClusterConfig(6, FOUR)
    servers.answers["10.0.0.1"] = servers.answers["10.0.0.3"] = ClusterConfig(6, FOUR)
    assert due(cluster, clock) == ClusterConfig(6, FOUR)
    node_calls = [call for call in servers.asked if call[0] != ENDPOINT.host]
    assert node_calls and all(
        hostname == f"{'abc'[int(ip[-1]) - 1]}.example" for ip, hostname in node_calls
    ), "each node is verified against its own hostname"


@pytest.mark.parametrize(
    "error", [WrongProtocolData("cfg", "garbage"), EndpointTLSError("cfg", "bad certificate")]
)
def test_endpoint_that_answers_wrongly_is_not_bypassed(make, clock, servers, error) -> None:
    cluster = make()
    cluster.current()
    servers.endpoint_answers(error)
    for node in THREE:
        servers.answers[node.ip] = ClusterConfig(6, FOUR)
    assert due(cluster, clock).nodes == THREE
    assert {host for host, _ in servers.asked} == {ENDPOINT.host}


def test_outage_with_silent_nodes_keeps_the_list(make, clock, servers, caplog) -> None:
    cluster = make()
    cluster.current()
    servers.endpoint_answers(EndpointUnreachable(ENDPOINT.host, "refused"))
    with caplog.at_level(logging.WARNING, logger="django_elasticache"):
        assert due(cluster, clock).nodes == THREE
    assert "asking the known nodes instead: no node answered" in caplog.text


# First discovery


def test_failed_first_discovery_is_remembered_from_the_end_of_the_attempt(
    make, clock, servers
) -> None:
    servers.endpoint_answers(EndpointTimeout(ENDPOINT.host, "timed out"))
    servers.during = lambda: clock.advance(2.0)  # the attempt takes the whole timeout
    cluster = make()
    with pytest.raises(EndpointTimeout, match=r"timed out$"):
        cluster.current()
    clock.advance(topology.FIRST_DISCOVERY_RETRY - 0.1)
    with pytest.raises(EndpointTimeout, match=r"0\.9 s ago; not asked again before 0\.1 s"):
        cluster.current()
    assert servers.endpoint_asked == 1
    clock.advance(0.1)
    servers.during = lambda: None
    servers.endpoint_answers(ClusterConfig(5, THREE))
    assert cluster.current().nodes == THREE
    assert servers.endpoint_asked == 2


def test_retry_runs_in_the_background_and_others_do_not_wait(clock, servers) -> None:
    """After a failure, the request that retries waits only the grace; later ones not at all."""
    started: list[Callable[[], None]] = []
    cluster = ClusterTopology(
        ENDPOINT,
        BackendOptions().discovery_settings,
        clock=clock,
        discover=servers,
        run_in_background=lambda work, name: started.append(work),
    )
    servers.endpoint_answers(EndpointUnreachable(ENDPOINT.host, "refused"))
    with pytest.raises(EndpointUnreachable):
        cluster.current()
    clock.advance(topology.FIRST_DISCOVERY_RETRY + topology.FIRST_DISCOVERY_GRACE)
    with pytest.raises(DiscoveryPending, match="still under way"):
        cluster.current()  # starts the retry, which has not run yet
    with pytest.raises(DiscoveryPending):
        cluster.current()
    assert len(started) == 1
    servers.endpoint_answers(ClusterConfig(5, THREE))
    started[0]()
    assert cluster.current().nodes == THREE


def test_concurrent_first_request_gives_up_after_the_grace(make, clock, servers) -> None:
    cluster = make()
    inside, release = threading.Event(), threading.Event()
    servers.during = lambda: (inside.set(), release.wait(30))
    first = threading.Thread(target=cluster.current)
    first.start()
    try:
        assert inside.wait(30)
        clock.advance(topology.FIRST_DISCOVERY_GRACE)
        with pytest.raises(DiscoveryPending, match="requests do not wait"):
            cluster.current()
    finally:
        release.set()
        first.join(30)
    assert cluster.current().nodes == THREE
    assert servers.endpoint_asked == 1


def test_concurrent_first_request_within_the_grace_gets_the_list(
    make, servers, monkeypatch
) -> None:
    monkeypatch.setattr(topology, "FIRST_DISCOVERY_GRACE", 60.0)
    cluster = make()
    inside, release = threading.Event(), threading.Event()
    servers.during = lambda: (inside.set(), release.wait(30))
    results: list[ClusterConfig] = []
    first = threading.Thread(target=lambda: results.append(cluster.current()))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=lambda: results.append(cluster.current()))
    second.start()
    release.set()
    first.join(30)
    second.join(30)
    assert [config.nodes for config in results] == [THREE, THREE]
    assert servers.endpoint_asked == 1


# Fork


def test_child_of_an_idle_parent_refreshes_at_its_first_request(make, clock, servers) -> None:
    cluster = make()
    parents = cluster.current()
    servers.endpoint_answers(ClusterConfig(6, FOUR))
    clock.advance(INTERVAL + 1)  # the parent serves nothing meanwhile
    cluster._after_fork_in_child()
    inherited = cluster.current()
    assert inherited is not parents and inherited.nodes == THREE
    assert cluster.current().nodes == FOUR


def test_child_of_a_fresh_parent_keeps_the_parents_schedule(make, clock, servers) -> None:
    cluster = make()
    cluster.current()
    clock.advance(0.5 * INTERVAL)
    cluster._after_fork_in_child()
    cluster.current()
    assert servers.endpoint_asked == 1
    clock.advance(0.5 * INTERVAL)
    cluster.current()
    assert servers.endpoint_asked == 2


def test_child_of_a_parent_without_refreshes_never_refreshes(make, clock, servers) -> None:
    cluster = make(refresh_interval=None)
    cluster.current()
    clock.advance(10 * INTERVAL)
    cluster._after_fork_in_child()
    cluster.current()
    assert servers.endpoint_asked == 1


# Serverless


def test_serverless_name_is_never_asked(make, clock, servers, caplog) -> None:
    endpoint = Endpoint("my-cache-abc123.serverless.use1.cache.amazonaws.com", 11211)
    with caplog.at_level(logging.WARNING, logger="django_elasticache"):
        cluster = make(endpoint)
        config = cluster.current()
        clock.advance(10 * INTERVAL)
        cluster.refresh_soon()
        assert cluster.current() is config
    assert config == ClusterConfig(0, (ClusterNode(endpoint.host, "", 11211),), serverless=True)
    assert servers.asked == []
    assert caplog.text == ""


def test_error_over_tls_means_serverless(make, clock, servers, caplog) -> None:
    servers.endpoint_answers(DiscoveryNotSupported(ENDPOINT.host, "ERROR"))
    with caplog.at_level(logging.WARNING, logger="django_elasticache"):
        cluster = make(tls=ssl.create_default_context())
        config = cluster.current()
        clock.advance(10 * INTERVAL)
        cluster.refresh_soon()
        cluster.current()
    assert config.serverless and config.addresses == ("cfg.example:11211",)
    assert servers.endpoint_asked == 1
    assert caplog.text == ""


def test_error_without_tls_still_needs_ignore_cluster_errors(make, servers) -> None:
    servers.endpoint_answers(DiscoveryNotSupported(ENDPOINT.host, "ERROR"))
    with pytest.raises(DiscoveryNotSupported):
        make().current()
    lenient = make(ignore_cluster_errors=True).current()
    assert not lenient.serverless and lenient.addresses == ("cfg.example:11211",)


class UnstartableThread(threading.Thread):
    """A thread the process cannot start, as when it has run out of threads."""

    def start(self) -> None:
        raise RuntimeError("can't start new thread")


def test_a_refresh_thread_that_cannot_start_does_not_stop_later_refreshes(
    clock, servers, caplog
) -> None:
    unstartable = [False]

    def run_in_a_thread(work: Callable[[], None], name: str) -> None:
        kind = UnstartableThread if unstartable.pop() else threading.Thread
        unstartable.append(False)
        thread = kind(target=work, name=name, daemon=True)
        thread.start()
        thread.join(30)

    cluster = ClusterTopology(
        ENDPOINT,
        BackendOptions(refresh_interval=INTERVAL).discovery_settings,
        clock=clock,
        discover=servers,
        run_in_background=run_in_a_thread,
    )
    assert cluster.current().nodes == THREE
    servers.endpoint_answers(ClusterConfig(6, FOUR))
    unstartable[0] = True
    with caplog.at_level(logging.ERROR, logger="django_elasticache"):
        assert due(cluster, clock).nodes == THREE  # the request itself is served
    assert "can't start new thread" in caplog.text
    assert due(cluster, clock).nodes == FOUR  # the next interval's refresh runs


def test_a_retried_first_discovery_whose_thread_cannot_start_is_started_again(
    clock, servers
) -> None:
    unstartable = [True]

    def run_in_a_thread(work: Callable[[], None], name: str) -> None:
        thread = (UnstartableThread if unstartable[0] else threading.Thread)(
            target=work, name=name, daemon=True
        )
        thread.start()
        thread.join(30)

    cluster = ClusterTopology(
        ENDPOINT,
        BackendOptions().discovery_settings,
        clock=clock,
        discover=servers,
        run_in_background=run_in_a_thread,
    )
    servers.endpoint_answers(EndpointUnreachable(ENDPOINT.host, "refused"))
    with pytest.raises(EndpointUnreachable):
        cluster.current()  # the very first discovery runs in the request
    servers.endpoint_answers(ClusterConfig(5, THREE))
    clock.advance(topology.FIRST_DISCOVERY_RETRY)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        cluster.current()
    unstartable[0] = False
    assert cluster.current().nodes == THREE


def test_a_refresh_that_never_came_to_run_holds_back_the_next_one_for_a_bounded_time(
    clock, servers
) -> None:
    """
    An exception landing between a refresh's bookkeeping and its thread's start (a signal
    handler's, a gevent timeout) leaves a refresh counted as running that never runs: once
    no refresh could still be running, the next interval starts one again.
    """
    lost = [False]

    def run_in_a_thread(work: Callable[[], None], name: str) -> None:
        if lost[0]:
            lost[0] = False
            return  # As if interrupted before the thread started: nothing runs.
        thread = threading.Thread(target=work, name=name, daemon=True)
        thread.start()
        thread.join(30)

    options = BackendOptions(refresh_interval=1).discovery_settings
    cluster = ClusterTopology(
        ENDPOINT, options, clock=clock, discover=servers, run_in_background=run_in_a_thread
    )
    assert cluster.current().nodes == THREE
    servers.endpoint_answers(ClusterConfig(6, FOUR))
    lost[0] = True
    clock.advance(1)
    cluster.current()  # starts the refresh that never runs
    clock.advance(1)
    cluster.current()
    assert cluster.current().nodes == THREE  # the lost refresh still counts as running
    clock.advance(cluster._refresh_bound())
    cluster.current()
    assert cluster.current().nodes == FOUR


class InterruptedOnce:
    """A lock whose next release raises ``Interrupted`` once it is armed, as a signal
    handler's exception may land as a ``with`` block gives its lock back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.armed = False

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()
        if self.armed:
            self.armed = False
            raise Interrupted


def interrupted_as_it_releases_the_lock(cluster: ClusterTopology) -> None:
    """A request to ``cluster`` interrupted as it first releases the topology's lock."""
    lock = cluster._lock = InterruptedOnce()  # type: ignore[assignment]
    lock.armed = True
    with pytest.raises(Interrupted):
        cluster.current()


def test_a_refresh_start_interrupted_after_its_claim_does_not_hold_back_the_next_one(
    make, clock, servers
) -> None:
    """
    The exception that interrupts a refresh's start as it releases the topology's lock
    reaches the request; the next interval refreshes, instead of waiting out the bound of
    a refresh counted as running.
    """
    cluster = make(refresh_interval=1)
    assert cluster.current().nodes == THREE
    servers.endpoint_answers(ClusterConfig(6, FOUR))
    clock.advance(1)
    interrupted_as_it_releases_the_lock(cluster)
    assert cluster.current().nodes == THREE  # not refreshed: its start was interrupted
    clock.advance(1)  # far less than the bound of a refresh counted as running
    cluster.current()
    assert cluster.current().nodes == FOUR


def test_a_first_discovery_interrupted_before_it_ran_is_started_again(make, servers) -> None:
    """Interrupted as it releases the lock, the first discovery never ran: the next request
    runs one, instead of waiting on it and raising ``DiscoveryPending`` ever after."""
    cluster = make()
    interrupted_as_it_releases_the_lock(cluster)
    assert servers.endpoint_asked == 0
    assert cluster.current().nodes == THREE


def test_a_retried_first_discovery_interrupted_before_it_started_is_started_again(
    make, clock, servers
) -> None:
    cluster = make()
    servers.endpoint_answers(EndpointUnreachable(ENDPOINT.host, "refused"))
    with pytest.raises(EndpointUnreachable):
        cluster.current()
    servers.endpoint_answers(ClusterConfig(5, THREE))
    clock.advance(topology.FIRST_DISCOVERY_RETRY)
    interrupted_as_it_releases_the_lock(cluster)
    assert servers.endpoint_asked == 1
    assert cluster.current().nodes == THREE
