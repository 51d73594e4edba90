"""`edge-hub telemetry`: the stored readings, filtered, in the documented JSON shape."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from edgefleet.wire.protocol import ACK, TELEMETRY, Ack, Batch, down_topic, pack, unpack, up_topic
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, run_cli

pytestmark = pytest.mark.integration


async def send(hub_dir: HubDir, bundle: Path, batch: Batch) -> None:
    """Publish a batch with the device's own certificate and wait for the hub's ack."""
    device = bundle.name
    session = await connect(device_identity(bundle), hub_dir.port, device)
    try:
        await session.subscribe([(down_topic(device, ACK), 1)])
        await session.publish(up_topic(device, TELEMETRY), pack(batch), qos=1)
        async with asyncio.timeout(10):
            while unpack((await session.next_message()).payload, Ack).through < batch.last:
                pass
    finally:
        await session.close()


async def telemetry(hub_dir: HubDir, *args: str) -> list[dict[str, object]]:
    code, out, err = await run_cli(HUB, "telemetry", "--dir", str(hub_dir.dir), "--json", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_telemetry_lists_filters_and_keeps_its_contract(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-t1", "dev-t2")
    now = time.time()
    await send(hub_dir, bundles / "dev-t1", Batch(
        base=0, last=3, settled=True, names=["temp", "load"], seq=[1, 2, 3],
        ts=[now - 7200, now - 60, now - 30], metric=[0, 1, 0], value=[20.5, 0.25, 21.0]))
    await send(hub_dir, bundles / "dev-t2", Batch(
        base=0, last=1, settled=True, names=["temp"], seq=[1], ts=[now - 10], metric=[0], value=[30.0]))

    rows = await telemetry(hub_dir)
    assert [(r["device"], r["seq"]) for r in rows] == [("dev-t1", 1), ("dev-t1", 2), ("dev-t1", 3), ("dev-t2", 1)]
    assert set(rows[0]) >= {"device", "seq", "ts", "metric", "value"}
    assert rows[0]["metric"] == "temp"
    assert rows[0]["value"] == 20.5
    assert abs(float(rows[0]["ts"]) - (now - 7200)) < 1e-3  # type: ignore[arg-type]

    assert [r["seq"] for r in await telemetry(hub_dir, "--device", "dev-t1", "--metric", "temp")] == [1, 3]
    assert [(r["device"], r["seq"]) for r in await telemetry(hub_dir, "--since", "1h")] == [
        ("dev-t1", 2), ("dev-t1", 3), ("dev-t2", 1)]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 45))
    assert [r["seq"] for r in await telemetry(hub_dir, "--device", "dev-t1", "--since", iso)] == [3]
    assert len(await telemetry(hub_dir, "--limit", "2")) == 2

    code, out, err = await run_cli(HUB, "telemetry", "--dir", str(hub_dir.dir), "--device", "dev-t2")
    assert code == 0
    assert "dev-t2\t1\t" in out
    assert "1 reading(s)" in err
    code, _, err = await run_cli(HUB, "telemetry", "--dir", str(hub_dir.dir), "--since", "yesterday-ish")
    assert code == 2
    assert "not a time" in err
