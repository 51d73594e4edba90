"""The agent's own figures on its optional /metrics endpoint (edgefleet.runtime.exposition serves them).

The agent's endpoint is optional and loopback only (`[metrics] port`, 0 = off): it is for a
node exporter or a local scraper on the device, never for the network. `prometheus_client`
is imported only when the endpoint is turned on (it adds about 1 MB of RSS to a 40 MB budget).

What the agent exposes (all `edgefleet_agent_*`):

- `outbox_backlog`: records not yet acknowledged by the hub; `ack_seq`: the sequence number
  the hub acknowledged through; `last_ack_timestamp_seconds`.
- `readings_shed_total{metric}`: readings shed by quota, by metric, since the outbox was made.
- `sensor_failures_total{sensor}`: failed reads since the agent started.
- `decision_latency_seconds`: a histogram, sample arrival to the actuator starting (P4),
  cumulative since this endpoint started; see `LatencyTally` for how it reads the engine.
- `actions_total{outcome}`: when the rule engine counts outcomes (`RuleEngine.outcomes`).
- `policy_version`: the signed policy version in force (0: none); `connected`: 1 when the
  MQTT session to the hub is up; `uplink_batches_sent_total`, `uplink_resends_total`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from edgefleet.runtime.exposition import LatencyTally, exposition_server, labelled, loopback, render_text

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from edge_agent.buffer.outbox import Outbox
    from edge_agent.decide.policy_intake import PolicyIntake
    from edge_agent.decide.rules import RuleEngine
    from edge_agent.sense.sensors import Sampler
    from edge_agent.sync.uplink import Uplink
    from edgefleet.mqtt.link import Link

log = logging.getLogger(__name__)

class ScrapedAgent(Protocol):
    """What a scrape reads of the running agent (edge_agent.agent.Agent), without importing it."""

    @property
    def engine(self) -> RuleEngine | None: ...
    @property
    def outbox(self) -> Outbox: ...
    @property
    def sampler(self) -> Sampler: ...
    @property
    def uplink(self) -> Uplink: ...
    @property
    def intake(self) -> PolicyIntake: ...
    @property
    def link(self) -> Link: ...


@dataclass(frozen=True)
class AgentFigures:
    """What one scrape of the agent reads, gathered on the event loop."""

    backlog: int
    shed_by_metric: Mapping[str, int]
    sensor_failures: Mapping[str, int]
    ack_seq: int
    last_ack_at: float | None
    batches_sent: int
    resends: int
    policy_version: int
    connected: bool
    outcomes: Mapping[str, int] | None


async def agent_figures(agent: ScrapedAgent) -> AgentFigures:
    engine = agent.engine
    # RuleEngine.outcomes ({"succeeded": n, ...}) is read when the engine keeps it.
    outcomes = engine.outcomes if engine is not None else None
    return AgentFigures(
        backlog=agent.outbox.backlog, shed_by_metric=(await agent.outbox.shed_report()).by_metric,
        sensor_failures=dict(agent.sampler.failures), ack_seq=agent.outbox.acked,
        last_ack_at=agent.uplink.last_ack_at, batches_sent=agent.uplink.batches_sent, resends=agent.uplink.resends,
        policy_version=agent.intake.version, connected=agent.link.connected.is_set(),
        outcomes=dict(outcomes) if isinstance(outcomes, Mapping) else None,
    )


class AgentMetrics:
    """The agent's /metrics: `await render()` on the agent's event loop."""

    def __init__(self, agent: ScrapedAgent) -> None:
        self._agent = agent
        self._latency = LatencyTally()

    async def render(self) -> bytes:
        figures = await agent_figures(self._agent)
        engine = self._agent.engine
        self._latency.update(engine.latencies_ms if engine is not None else None)
        return render_text(_agent_families(figures, self._latency))


def _agent_families(f: AgentFigures, latency: LatencyTally) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    p = "edgefleet_agent_"
    yield GaugeMetricFamily(p + "outbox_backlog", "Records in the outbox not yet acknowledged by the hub.",
                            value=f.backlog)
    yield GaugeMetricFamily(p + "ack_seq", "Sequence number the hub has acknowledged through.", value=f.ack_seq)
    if f.last_ack_at is not None:
        yield GaugeMetricFamily(p + "last_ack_timestamp_seconds", "When the hub's latest acknowledgment arrived.",
                                value=f.last_ack_at)
    yield labelled(CounterMetricFamily(p + "readings_shed", "Readings shed by the outbox quota, by metric.",
                                       labels=["metric"]), f.shed_by_metric)
    yield labelled(CounterMetricFamily(p + "sensor_failures", "Failed sensor reads since the agent started.",
                                       labels=["sensor"]), f.sensor_failures)
    histogram = HistogramMetricFamily(
        p + "decision_latency_seconds", "Rule decisions: sample arrival to the actuator starting.")
    histogram.add_metric([], latency.cumulative(), latency.sum_s)
    yield histogram
    if f.outcomes is not None:
        yield labelled(CounterMetricFamily(p + "actions", "Rule actions by outcome.", labels=["outcome"]),
                       f.outcomes)
    yield GaugeMetricFamily(p + "policy_version", "Signed policy version in force (0: none).",
                            value=f.policy_version)
    yield GaugeMetricFamily(p + "connected", "1 while the MQTT session to the hub is up.", value=int(f.connected))
    yield CounterMetricFamily(p + "uplink_batches_sent", "Telemetry batches sent.", value=f.batches_sent)
    yield CounterMetricFamily(p + "uplink_resends", "Times the uplink resent from the last ack (ack timeout).",
                              value=f.resends)


async def serve_agent_metrics(agent: ScrapedAgent, host: str, port: int) -> None:
    """Serve the agent's /metrics on a loopback address until cancelled; port 0: off (returns at once).

    A port that cannot be bound is logged as an ERROR and the agent carries on without metrics:
    sensing and buffering never depend on them. A non-loopback host raises ConfigError.
    """
    loopback(host)
    if not port:
        return
    metrics = AgentMetrics(agent)
    try:
        async with exposition_server(host, port, metrics.render):
            await asyncio.Future()  # until cancelled
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%d (%s): choose another metrics.port, or 0 to turn them off",
                  host, port, exc.strerror or exc)

