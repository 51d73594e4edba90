"""P7: uplink bytes with report-by-exception against raw, on the sim profile's slow signals.

    .venv/bin/python bench/p7_report.py [--minutes M] [--rate-hz HZ] [--signals N]

The agent's own pipeline, in simulated time (no clock, no network): SimSensor (the sim
profile's signals at `--rate-hz`, read every sensor interval of the profile) -> ReportFilter
-> sequence numbers as the outbox assigns them -> edge_agent.sync.uplink.encode_batch (which
packs with edgefleet.wire.protocol.pack). Two paths over the very same samples:

- filtered: the sim profile's [report] settings (deadband, heartbeat, aggregation);
- raw (the baseline): the same with every deadband 0 (the filter passes everything).

Two batching cases, both as the uplink forms batches:
- live: a connected agent sends one batch per outbox commit that added records (the
  sampler and the outbox's COMMIT_INTERVAL both tick every 0.1 s: one batch per read);
- backlog: after a partition, batches of the uplink's batch_max records.

Bytes are the packed batch payloads (what the uplink publishes). An on-the-wire estimate
adds per message the MQTT v5 PUBLISH header (QoS 1, the telemetry topic) and a TLS 1.2
AES-GCM record (29 bytes). Status messages (every 10 s, the same in both paths) are left out.

Error: after every sample, for every metric, |true value - last value reported| (what the
hub holds); its maximum must stay within the metric's deadband (with aggregate_s set, which
the sim profile does not, the filter bounds the error against window means instead). Prints PASS/MISS against
the target (docs/performance.md: >= 10 x fewer bytes) and a final JSON line. Always exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_agent.buffer.outbox import COMMIT_INTERVAL, Record  # noqa: E402 - after the path fix above
from edge_agent.sense.report import ReportFilter  # noqa: E402
from edge_agent.sense.sensors import Reading, SimSensor, device_seed  # noqa: E402
from edge_agent.sync.uplink import UplinkSettings, encode_batch  # noqa: E402
from edgefleet.policy.profiles import load_profile  # noqa: E402
from edgefleet.wire.protocol import TELEMETRY, up_topic  # noqa: E402

TARGET_RATIO: Final = 10.0  # P7 (docs/performance.md)
DEVICE: Final = "p7-bench"
T0: Final = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a fixed start makes every run identical
TLS12_RECORD: Final = 5 + 8 + 16  # header, explicit nonce, GCM tag
BATCH_MAX: Final = UplinkSettings().batch_max


def publish_overhead(topic: str, payload: int) -> int:
    """MQTT v5 PUBLISH QoS 1 without properties, plus one TLS 1.2 record."""
    rest = 2 + len(topic) + 2 + 1 + payload  # topic length + topic, packet id, properties length
    length_bytes = 1 if rest < 128 else 2 if rest < 16_384 else 3 if rest < 2_097_152 else 4
    return 1 + length_bytes + rest - payload + TLS12_RECORD


@dataclass
class Path_:
    """One uplink path: its filter, its outbox sequence numbers, its batches and what the hub holds."""

    report: ReportFilter
    topic: str
    seq: int = 0
    cursor: int = 0
    records: list[Record] = field(default_factory=list)
    messages: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    held: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (value, ts) at the hub
    max_error: dict[str, float] = field(default_factory=dict)
    max_age: float = 0.0

    def take(self, readings: list[Reading], now: float | None = None) -> list[Record]:
        """Filter, then number the survivors as Outbox.add does; `now` also closes aggregation windows."""
        passed = self.report.filter(readings)
        if now is not None:
            passed += self.report.flush(now)  # the agent's _close_windows, when aggregate_s is set
        new = []
        for metric, ts, value in passed:
            self.seq += 1
            new.append(Record(self.seq, ts, metric, value, None, None))
        self.records.extend(new)
        return new

    def send(self, records: list[Record]) -> None:
        """The uplink's batch for these records (seq > cursor), as it would publish it."""
        for start in range(0, len(records), BATCH_MAX):
            chunk = records[start:start + BATCH_MAX]
            batch, payload = encode_batch(self.cursor, chunk, settled=self.cursor == 0)
            if batch.last != chunk[-1].seq:  # encode_batch halves over the payload limit: keep it simple
                raise RuntimeError("a batch did not fit the payload limit")
            self.cursor = batch.last
            self.messages += 1
            self.payload_bytes += len(payload)
            self.wire_bytes += len(payload) + publish_overhead(self.topic, len(payload))

    def observe(self, truth: list[Reading], sent: list[Record]) -> None:
        for r in sent:
            assert r.metric is not None
            assert r.value is not None
            self.held[r.metric] = (r.value, r.ts)
        for metric, ts, value in truth:
            held_value, held_ts = self.held[metric]
            self.max_error[metric] = max(self.max_error.get(metric, 0.0), abs(value - held_value))
            self.max_age = max(self.max_age, ts - held_ts)


def simulate(minutes: float, rate_hz: float, signals: int) -> dict[str, Any]:
    profile = load_profile("sim", [(["sim", "rate_hz"], rate_hz), (["sim", "signals"], signals)])
    spec = profile.report
    raw_spec = msgspec.structs.replace(spec, default_deadband=0.0, deadband={}, aggregate_s=0.0)
    interval = profile.sensors[0].interval_s
    sensor = SimSensor(profile.sim, device_seed(DEVICE), interval)
    topic = up_topic(DEVICE, TELEMETRY)
    paths = {"filtered": Path_(ReportFilter(spec), topic), "raw": Path_(ReportFilter(raw_spec), topic)}
    if not paths["raw"].report.passthrough:
        raise RuntimeError("the raw path's filter is not a passthrough")
    samples = 0
    steps = round(minutes * 60 / interval)
    sensor.read(T0)  # the first read only sets the sensor's position (one tick), like the agent's first
    started = time.perf_counter()
    for step in range(1, steps + 1):
        now = T0 + step * interval
        readings = sensor.read(now)
        samples += len(readings)
        for path in paths.values():
            new = path.take(readings, now if spec.aggregate_s else None)
            if new:
                path.send(new)  # live: one batch per commit that added records
            path.observe(readings, new)
    elapsed = time.perf_counter() - started
    result: dict[str, Any] = {
        "minutes": minutes, "rate_hz": rate_hz, "signals": signals, "samples": samples,
        "report": msgspec.to_builtins(spec), "sensor_interval_s": interval, "commit_interval_s": COMMIT_INTERVAL,
        "simulate_s": round(elapsed, 2),
    }
    for name, p in paths.items():
        backlog = Path_(p.report, topic)  # same records, batched as after a partition
        backlog.send(p.records)
        bands = {m: spec.deadband.get(m, spec.default_deadband) if name == "filtered" else 0.0 for m in p.max_error}
        result[name] = {
            "readings_sent": len(p.records),
            "live_messages": p.messages, "live_payload_bytes": p.payload_bytes, "live_wire_bytes_est": p.wire_bytes,
            "backlog_messages": backlog.messages, "backlog_payload_bytes": backlog.payload_bytes,
            "backlog_wire_bytes_est": backlog.wire_bytes,
            "max_error": round(max(p.max_error.values(), default=0.0), 6),
            "max_error_by_metric": {m: round(v, 6) for m, v in sorted(p.max_error.items())},
            "within_deadband": all(v <= bands[m] for m, v in p.max_error.items()),
            "max_age_s": round(p.max_age, 2),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=30.0, help="simulated minutes (default 30)")
    parser.add_argument("--rate-hz", type=float, default=10.0, help="sim.rate_hz (default 10)")
    parser.add_argument("--signals", type=int, default=4, help="sim.signals (default 4, the profile's)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate_hz <= 0 or args.signals < 1:
        parser.error("--minutes, --rate-hz and --signals must be positive")
    r = simulate(args.minutes, args.rate_hz, args.signals)
    f, raw = r["filtered"], r["raw"]
    spec = r["report"]
    print(f"P7 report by exception: {args.minutes:g} simulated minutes, {args.signals} signals at {args.rate_hz:g} Hz "
          f"= {r['samples']:,} samples; sim profile [report] {spec}")
    print(f"readings sent: filtered {f['readings_sent']:,}, raw {raw['readings_sent']:,} "
          f"({raw['readings_sent'] / max(f['readings_sent'], 1):.1f} x fewer)")
    ratios: dict[str, float] = {}
    for case, what in (("live", "one batch per outbox commit"), ("backlog", f"batches of {BATCH_MAX}")):
        for unit in ("payload_bytes", "wire_bytes_est"):
            key = f"{case}_{unit}"
            ratios[key] = raw[key] / max(f[key], 1)
        print(f"{case} ({what}): filtered {f[f'{case}_messages']:,} messages, {f[f'{case}_payload_bytes']:,} payload "
              f"bytes; raw {raw[f'{case}_messages']:,} messages, {raw[f'{case}_payload_bytes']:,} bytes -> "
              f"{ratios[f'{case}_payload_bytes']:.1f} x fewer (on-wire estimate: {f[f'{case}_wire_bytes_est']:,} vs "
              f"{raw[f'{case}_wire_bytes_est']:,} bytes, {ratios[f'{case}_wire_bytes_est']:.1f} x)")
    band = spec["default_deadband"]
    print(f"max |true - last reported| (filtered): {f['max_error']} (deadband {band}; by metric "
          f"{f['max_error_by_metric']}); within the deadband: {f['within_deadband']}; the hub's value was at most "
          f"{f['max_age_s']} s old (heartbeat {spec['heartbeat_s']} s)")
    worst = min(ratios["live_payload_bytes"], ratios["backlog_payload_bytes"])
    ok = worst >= TARGET_RATIO and f["within_deadband"] and math.isfinite(f["max_error"])
    print(f"target >= {TARGET_RATIO:.0f} x fewer bytes (both batching cases) within the deadband: "
          f"{'PASS' if ok else 'MISS'}")
    print(json.dumps({"bench": "p7_report", "target_ratio": TARGET_RATIO,
                      "ratios": {k: round(v, 2) for k, v in ratios.items()}, "pass": ok, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
