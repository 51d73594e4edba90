"""Prometheus metrics: the hub's endpoint parses with prometheus-client's own parser and its
figures are the hub database's state; the agent's endpoint is loopback only and counts decisions once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.agent import Agent
from edge_agent.config import load_settings
from edge_agent.metrics import serve_agent_metrics
from edge_agent.sense.sensors import Reading
from edgefleet.errors import ConfigError
from edgefleet.runtime.exposition import LatencyTally, exposition_server, loopback
from edgefleet.wire.protocol import LeaseRequest, Presence, Status
from hub.db.store import HubStore, IngestWork
from hub.metrics import COVERAGE_WINDOW_S, HubCollector, MetricsError, render, serve_metrics
from hub.region.coordination import Coordination
from tests.support.harness import HubDir, Proc, free_port, start_agent

REGION, HUB = "eu-1", "hub.eu-1"
T0 = 1_700_000_000.0
GRACE = 120.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type, as Prometheus would read them."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"region": REGION, **labels}.items()))]


def series(samples: Samples, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} of one family (across the other labels, which must not repeat)."""
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            key = dict(labels)[label]
            assert key not in out, f"{name}: {label}={key} twice"
            out[key] = v
    return out


def action(kind: str, latency_ms: float | None = None, detail: str = "") -> str:
    return json.dumps({"policy_version": 2, "rule": "cool", "action": "record", "detail": detail,
                       "latency_ms": latency_ms})


@contextlib.asynccontextmanager
async def hub_state(tmp_path: Path) -> AsyncIterator[HubStore]:
    """A hub database with a known state of every kind the metrics read.

    live-1: online, policy 2 = intended, fresh readings, 4 actions, holds lease `pump`.
    live-2: online on policy 1 though 2 is intended since long ago (drifted), old readings only,
            queued for `pump` since T0 - 40.
    quiet:  registered, offline, nothing sent; queued for `pump` since T0 - 10.
    gone:   revoked (in no per-device figure).
    """
    store = await HubStore.open(tmp_path / "hub.db")
    try:
        for device in ("live-1", "live-2", "quiet", "gone"):
            await store.register(device, "sim", {"site": "lab"})
        for device in ("live-1", "live-2", "gone"):
            assert await store.apply_presence(device, Presence(state="online", session="s1"), T0 - 3600)
        assert await store.apply_presence("quiet", Presence(state="online", session="s1"), T0 - 3600)
        for serial, (device, days) in enumerate((("live-1", 30), ("live-1", 90), ("live-2", 5), ("gone", 60)), 1):
            expires = dt.datetime.fromtimestamp(T0 + days * 86400, dt.UTC)
            await store.record_certificate(serial, device, "device", expires)
        await store.record_certificate(0xBEEF, "quiet", "device", dt.datetime.fromtimestamp(T0 + 86400, dt.UTC))
        await store.revoke_serial(0xBEEF)  # its only certificate is revoked: no expiry to show
        await store.record_certificate(0xCAFE, "live-2", "kick", dt.datetime.fromtimestamp(T0 + 1, dt.UTC))

        async def assign(db: Any) -> None:
            for version in (1, 2):
                await db.execute("INSERT INTO policies(version, text, sha256, created_at, origin) "
                                 "VALUES (?, '', '', ?, 'test')", (version, T0 - 7200))
            await db.executemany("INSERT INTO assignments(device, version, assigned_at) VALUES (?, 2, ?)",
                                 [("live-1", T0 - 7200), ("live-2", T0 - 7200), ("quiet", T0 - 7200)])
        await store.atomically(assign)

        await store.commit_ingest(IngestWork(
            now=T0 - 5,
            telemetry=[("live-1", 1, T0 - 100, "sig0", 1.0), ("live-1", 2, T0 - 60, "sig1", 2.0),
                       ("live-2", 1, T0 - 3000, "sig0", 3.0)],
            events=[("live-1", 3, T0 - 59, "action_succeeded", action("a", 3.0)),
                    ("live-1", 4, T0 - 58, "action_failed", action("b", 40.0, "exit 1")),
                    ("live-1", 5, T0 - 57, "action_refused", action("c", None, "no lease 'pump': no place within 5 s")),
                    ("live-1", 6, T0 - 56, "action_skipped", action("d", None, "within its cooldown of 60 s")),
                    ("live-1", 7, T0 - 55, "rule_fired", action("e")),
                    ("live-2", 2, T0 - 2999, "action_succeeded", action("f", 700.0)),
                    ("live-2", 9, T0 - 2990, "action_refused", action("g", None, "no approval: denied by ops")),
                    ("gone", 1, T0 - 50, "action_succeeded", action("h", 1.5))],
            # live-2's seq 9 arrived above a gap: stored, not yet acknowledged.
            ranges={"live-1": [(0, 7, False)], "live-2": [(0, 2, False)], "gone": [(0, 1, False)]},
            statuses={"live-1": Status(backlog=5, dropped=3, dropped_by_metric={"sig0": 2, "sig1": 1},
                                       sensor_failures={"sim": 4}, policy_version=2),
                      "live-2": Status(backlog=0, dropped=0, policy_version=1)},
            rejects={"bad_topic": 2, "unknown_device": 1}))
        await store.commit_ingest(IngestWork(now=T0 - 4, rejects={"bad_topic": 1}))
        assert await store.apply_presence("quiet", Presence(state="offline", session="s1"), T0 - 1800)
        await store.revoke_device("gone")

        coordination = Coordination(store, HUB)
        for device, at in (("live-1", T0 - 50), ("live-2", T0 - 40), ("quiet", T0 - 10)):
            await coordination.handle([(device, LeaseRequest(id=f"r-{device}", name="pump", limit=1, ttl_s=3600))],
                                      now=at)

        async def expiries(db: Any) -> None:
            for token in (7, 8):
                await store.hub_event(db, HUB, "lease_expired", {"lease": "old", "device": "x", "token": token})
        await store.atomically(expiries)
        yield store
    finally:
        await store.close()


async def test_hub_metrics_parse_and_are_the_hub_state(tmp_path: Path) -> None:
    async with hub_state(tmp_path) as store:
        samples, types = parse(render(tmp_path / "hub.db", REGION, drift_grace_s=GRACE, now=T0))
        rows = {r.device: r for r in await store.devices(drift_grace_s=GRACE, now=T0)}
        live = {d: r for d, r in rows.items() if not r.revoked}

        # Devices online and total, as `edge-hub devices` shows them.
        assert value(samples, "edgefleet_devices_registered") == len(live) == 3
        assert value(samples, "edgefleet_devices_online") == sum(r.online for r in live.values()) == 2
        assert value(samples, "edgefleet_devices_revoked") == 1
        assert series(samples, "edgefleet_device_online", "device") == {d: r.online for d, r in live.items()}

        # Coverage: live-1's newest reading is 60 s old, live-2's 3000 s, quiet has none.
        assert COVERAGE_WINDOW_S == 300
        assert value(samples, "edgefleet_telemetry_covered_devices") == 1
        assert value(samples, "edgefleet_telemetry_coverage_ratio") == pytest.approx(1 / 3)
        assert series(samples, "edgefleet_device_last_reading_timestamp_seconds", "device") == {
            "live-1": T0 - 60, "live-2": T0 - 3000}

        # Ingest: the watermark counter (rate() of it is the ingest rate), rejects by reason.
        marks = await store.watermarks()
        assert series(samples, "edgefleet_ingest_acked_records_total", "device") == {
            d: marks[d] for d in ("live-1", "live-2")}
        assert series(samples, "edgefleet_ingest_rejects_total", "reason") == await store.reject_counts() == {
            "bad_topic": 3, "unknown_device": 1}

        # Backlog and shed readings per device, as last reported.
        assert series(samples, "edgefleet_device_backlog", "device") == {
            d: r.backlog for d, r in live.items() if r.backlog is not None}
        assert value(samples, "edgefleet_device_readings_shed_total", device="live-1", metric="sig0") == 2
        assert value(samples, "edgefleet_device_readings_shed_total", device="live-1", metric="sig1") == 1
        assert value(samples, "edgefleet_device_sensor_failures_total", device="live-1", sensor="sim") == 4

        # Actions by outcome (success rate in PromQL), coordination refusals, decision latency.
        outcomes = {(dict(k)["device"], dict(k)["outcome"]): v for (n, k), v in samples.items()
                    if n == "edgefleet_actions_total"}
        assert outcomes == {("live-1", "succeeded"): 1, ("live-1", "failed"): 1, ("live-1", "refused"): 1,
                            ("live-1", "skipped"): 1, ("live-2", "succeeded"): 1, ("live-2", "failed"): 0,
                            ("live-2", "refused"): 1, ("live-2", "skipped"): 0}
        assert value(samples, "edgefleet_coordination_refusals_total", device="live-1", need="lease") == 1
        assert value(samples, "edgefleet_coordination_refusals_total", device="live-2", need="approval") == 1
        assert types["edgefleet_decision_latency_seconds"] == "histogram"
        # 3 ms, 40 ms, 700 ms, and the revoked device's 1.5 ms (a region counter never goes down).
        assert value(samples, "edgefleet_decision_latency_seconds_count") == 4
        assert value(samples, "edgefleet_decision_latency_seconds_sum") == pytest.approx(0.7445)
        assert value(samples, "edgefleet_decision_latency_seconds_bucket", le="0.0025") == 1
        assert value(samples, "edgefleet_decision_latency_seconds_bucket", le="0.005") == 2
        assert value(samples, "edgefleet_decision_latency_seconds_bucket", le="0.05") == 3
        assert value(samples, "edgefleet_decision_latency_seconds_bucket", le="0.5") == 3
        assert value(samples, "edgefleet_decision_latency_seconds_bucket", le="+Inf") == 4

        # Devices on their intended policy version, and drifted ones (as `edge-hub devices` says).
        assert value(samples, "edgefleet_policy_devices_assigned") == 3
        assert value(samples, "edgefleet_policy_devices_on_intended") == sum(
            r.policy_version == r.policy_intended for r in live.values()) == 1
        assert value(samples, "edgefleet_policy_devices_drifted") == sum(
            r.policy_drifted for r in live.values()) == 1

        # Leases: live-1 holds pump, live-2 and quiet wait; two expired at their TTL.
        assert value(samples, "edgefleet_lease_grants_total", lease="pump") == 1
        assert value(samples, "edgefleet_lease_holders", lease="pump") == 1
        assert value(samples, "edgefleet_lease_queued", lease="pump") == 2
        assert value(samples, "edgefleet_lease_longest_wait_seconds", lease="pump") == 40
        assert value(samples, "edgefleet_lease_expiries_total") == 2

        # Certificate expiry: the newest unrevoked device certificate, as `edge-hub devices` shows it.
        expiry = series(samples, "edgefleet_device_certificate_expiry_seconds", "device")
        assert expiry == {"live-1": 90 * 86400, "live-2": 5 * 86400}
        for device, seconds in expiry.items():
            assert live[device].cert_expires == dt.datetime.fromtimestamp(T0 + seconds, dt.UTC).isoformat(
                timespec="seconds")

        # Nothing about the revoked device, per device.
        assert not [k for k in samples if ("device", "gone") in k[1]]


async def test_action_counts_are_kept_between_scrapes_and_never_counted_twice(tmp_path: Path) -> None:
    """Settled action events are counted once and kept; those above a gap are recounted each
    scrape until the gap closes; a scrape matches a fresh render of the same database."""
    async with hub_state(tmp_path) as store:
        collector = HubCollector(tmp_path / "hub.db", REGION, clock=lambda: T0)

        def scrape() -> dict[tuple[str, str], float]:
            return {(s.labels["device"], s.labels["outcome"]): s.value for family in collector.collect()
                    if family.name == "edgefleet_actions" for s in family.samples}

        first = scrape()
        assert scrape() == first
        # live-2's gap closes (seq 3..8 arrive) and more actions come in, one above a new gap.
        await store.commit_ingest(IngestWork(
            now=T0, events=[("live-2", 5, T0, "action_failed", action("i", 12.0)),
                            ("live-2", 12, T0, "action_succeeded", action("j", 2.0)),
                            ("live-1", 8, T0, "action_succeeded", action("k", 1.0))],
            ranges={"live-2": [(2, 9, False)], "live-1": [(7, 8, False)]}))
        second = scrape()
        assert second[("live-2", "failed")] == 1
        assert second[("live-2", "succeeded")] == 2  # seq 2 (settled before), seq 12 (above the gap)
        assert second[("live-2", "refused")] == 1  # seq 9: settled now, counted once
        assert second[("live-1", "succeeded")] == 2
        assert scrape() == second
        fresh, _ = parse(render(tmp_path / "hub.db", REGION, now=T0))
        latency = next(f for f in collector.collect() if f.name == "edgefleet_decision_latency_seconds")
        assert {s.name: s.value for s in latency.samples if s.name.endswith(("_count", "_sum"))} == {
            "edgefleet_decision_latency_seconds_count": value(fresh, "edgefleet_decision_latency_seconds_count"),
            "edgefleet_decision_latency_seconds_sum": value(fresh, "edgefleet_decision_latency_seconds_sum")}
        assert second == {
            (dict(k)["device"], dict(k)["outcome"]): v for (n, k), v in fresh.items() if n == "edgefleet_actions_total"}


async def test_hub_serves_metrics_over_http_while_it_writes(tmp_path: Path) -> None:
    async with hub_state(tmp_path) as store:
        port = free_port()
        server = asyncio.create_task(serve_metrics(tmp_path / "hub.db", "127.0.0.1", port, REGION))
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            body, kind = await eventually_get(url)
            assert kind.startswith("text/plain; version=0.0.4")
            samples, _ = parse(body)
            assert value(samples, "edgefleet_devices_registered") == 3
            assert value(samples, "edgefleet_ingest_rejects_total", reason="bad_topic") == 3

            await store.commit_ingest(IngestWork(now=T0, rejects={"bad_topic": 5}))  # the hub keeps writing
            samples, _ = parse((await get(url))[0])
            assert value(samples, "edgefleet_ingest_rejects_total", reason="bad_topic") == 8

            with pytest.raises(urllib.error.HTTPError) as missing:
                await get(f"http://127.0.0.1:{port}/")
            assert missing.value.code == 404
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server


async def test_a_taken_port_is_a_clear_error_and_port_0_is_off(tmp_path: Path) -> None:
    async with hub_state(tmp_path):
        await asyncio.wait_for(serve_metrics(tmp_path / "hub.db", "127.0.0.1", 0, REGION), 1)  # off: returns
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(MetricsError, match=r"\[metrics\] port in hub.toml"):
                await serve_metrics(tmp_path / "hub.db", "127.0.0.1", port, REGION)


async def test_an_unreadable_database_answers_503_and_the_server_carries_on(tmp_path: Path) -> None:
    port = free_port()
    server = asyncio.create_task(serve_metrics(tmp_path / "missing.db", "127.0.0.1", port, REGION))
    try:
        with pytest.raises(urllib.error.HTTPError) as unavailable:
            await eventually_get(f"http://127.0.0.1:{port}/metrics")
        assert unavailable.value.code == 503
        assert not server.done()
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


# --- the agent ---------------------------------------------------------------------------------

AGENT_TOML = """\
device_id = "dev-1"
profile = "sim"
region = "eu-1"
policy = "local-policy.toml"

[broker]
host = "127.0.0.1"

[state]
dir = "state"
"""

LOCAL_POLICY = """\
[[rules]]
name = "hot"
when = "sig0 > 5"
clear = "sig0 < 4"
action = "record"
offline = "act"
"""


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    (tmp_path / "agent.toml").write_text(AGENT_TOML, encoding="utf-8")
    (tmp_path / "local-policy.toml").write_text(LOCAL_POLICY, encoding="utf-8")
    settings = load_settings(tmp_path / "agent.toml")
    a = await Agent.open(settings, settings.load_policy())
    try:
        yield a
    finally:
        await a.close()


async def decide(agent: Agent, times: int) -> None:
    """`times` decisions of the rule: the signal crosses its threshold and falls back each time."""
    assert agent.engine is not None
    for i in range(times):
        agent.engine.on_readings([Reading("sig0", T0 + i, 10.0)])
        await agent.engine.drain()
        agent.engine.on_readings([Reading("sig0", T0 + i + 0.5, 0.0)])
        await agent.engine.drain()


async def test_agent_metrics_over_a_real_agent(agent: Agent) -> None:
    port = free_port()
    server = asyncio.create_task(serve_agent_metrics(agent, "127.0.0.1", port))
    try:
        await decide(agent, 3)
        agent.outbox.add([Reading("sig1", T0, 1.0), Reading("sig1", T0 + 1, 2.0)])
        body, _ = await eventually_get(f"http://127.0.0.1:{port}/metrics")
        samples, types = parse(body)

        def figure(name: str, **labels: str) -> float:
            return samples[(f"edgefleet_agent_{name}", frozenset(labels.items()))]

        assert figure("outbox_backlog") == agent.outbox.backlog > 0
        assert figure("ack_seq") == agent.outbox.acked == 0
        assert figure("connected") == 0
        assert figure("policy_version") == agent.intake.version == 0
        assert types["edgefleet_agent_decision_latency_seconds"] == "histogram"
        assert figure("decision_latency_seconds_count") == 3
        assert figure("decision_latency_seconds_bucket", le="+Inf") == 3
        assert figure("sensor_failures_total", sensor="sim") == 0

        await decide(agent, 2)  # counted once more each, not again the first three
        samples, _ = parse((await get(f"http://127.0.0.1:{port}/metrics"))[0])
        assert figure("decision_latency_seconds_count") == 5
        assert figure("decision_latency_seconds_sum") == pytest.approx(sum(agent.engine.latencies_ms) / 1000)
        # The engine counts outcomes as it audits them: five decisions, five actions that succeeded.
        assert figure("actions_total", outcome="succeeded") == agent.engine.outcomes["succeeded"] == 5
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


def test_latency_tally_counts_each_sample_once_though_the_deque_forgets() -> None:
    tally = LatencyTally()
    window: collections.deque[float] = collections.deque(maxlen=3)
    for ms in (1.0, 2.0):
        window.append(ms * 1.0)
    tally.update(window)
    assert tally.count == 2
    tally.update(window)
    assert tally.count == 2
    for ms in (3.0, 400.0, 5.0, 6.0):  # the deque is full: its length no longer says anything
        window.append(ms + 0.0)
    tally.update(window)
    assert tally.count == 5  # the 4th new sample was pushed out before this scrape: at most 3 are visible
    assert tally.sum_s == pytest.approx((1 + 2 + 400 + 5 + 6) / 1000)
    assert dict(tally.cumulative())["0.25"] == 4
    tally.update(collections.deque([7.0]))  # a new engine (a new policy): all of its deque is new
    assert tally.count == 6


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "localhost", "hub.example.net"])
async def test_agent_metrics_refuse_anything_but_loopback(agent: Agent, host: str) -> None:
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1 or ::1"):
        await serve_agent_metrics(agent, host, 9465)
    assert loopback("127.0.0.1") == "127.0.0.1"
    assert loopback("::1") == "::1"


async def test_agent_carries_on_when_its_metrics_port_is_taken(agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        await asyncio.wait_for(serve_agent_metrics(agent, "127.0.0.1", taken.getsockname()[1]), 5)
    assert "choose another metrics.port" in caplog.text


def test_importing_the_agent_metrics_module_does_not_load_prometheus_client() -> None:
    """The agent pays for prometheus_client (about 1 MB of RSS) only when the endpoint is on."""
    code = "import sys, edge_agent.agent, edge_agent.metrics; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


async def test_a_failing_render_is_a_500_and_the_next_scrape_works() -> None:
    calls = iter([RuntimeError("boom"), b"ok 1\n"])

    async def render() -> bytes:
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    async with exposition_server("127.0.0.1", 0, render) as port:
        with pytest.raises(urllib.error.HTTPError) as failed:
            await get(f"http://127.0.0.1:{port}/metrics")
        assert failed.value.code == 500
        assert (await get(f"http://127.0.0.1:{port}/metrics"))[0] == b"ok 1\n"


# --- helpers -------------------------------------------------------------------------------------


async def get(url: str) -> tuple[bytes, str]:
    def fetch() -> tuple[bytes, str]:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read(), response.headers["Content-Type"]
    return await asyncio.to_thread(fetch)


async def eventually_get(url: str, timeout: float = 5.0) -> tuple[bytes, str]:
    """GET once the server listens (it starts in a task); HTTP errors are answers, not waits."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await get(url)
        except urllib.error.HTTPError:
            raise
        except urllib.error.URLError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.02)



# --- a real hub -----------------------------------------------------------------------------


async def test_a_running_hub_serves_its_state_on_the_configured_port(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """`edge-hub run` with the [metrics] port of hub.toml: the figures are the fleet's, live."""
    await hub_dir.provision(bundles, "m-1", "m-2")
    agent = await start_agent(bundles / "m-1" / "agent.toml", "uplink.status_interval=1", name="m-1")
    try:
        await hub.wait_for(r"device m-1 is online")

        def scrape() -> Samples:
            url = f"http://127.0.0.1:{hub_dir.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:  # a loopback URL we built
                return parse(response.read())[0]

        samples = await asyncio.to_thread(scrape)
        labels = {"region": hub_dir.region}
        assert samples[("edgefleet_devices_registered", frozenset(labels.items()))] == 2
        assert samples[("edgefleet_devices_online", frozenset(labels.items()))] == 1
        online = {dict(k[1])["device"]: v for k, v in samples.items() if k[0] == "edgefleet_device_online"}
        assert online == {"m-1": 1.0, "m-2": 0.0}
    finally:
        await agent.stop()
