"""Alerts a device raises (warning, critical) reach `edge-hub status`'s "needs a person", for a
day after they were raised (real hub, the device's own certificate, real CLI)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgefleet.wire.protocol import Batch
from tests.integration.test_events_cli import ev, send
from tests.support.harness import HUB, HubDir, Proc, run_cli

pytestmark = pytest.mark.integration


async def test_warning_and_critical_alerts_need_a_person(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-a1", "dev-a2")
    now = time.time()
    await send(hub_dir, bundles / "dev-a1", Batch(base=0, last=6, settled=True, events=[
        ev(1, now - 3 * 86400, "alert", message="fan stalled", severity="critical"),  # days old: not shown
        ev(2, now - 600, "alert", message="CPU hot", severity="warning"),
        ev(3, now - 300, "alert", message="CPU hot", severity="warning"),  # the same again: counted, newest shown
        ev(4, now - 200, "alert", message="booted", severity="info"),  # for the record only
        ev(5, now - 100, "action_succeeded", action="alert", detail="raised a warning alert."),
        ev(6, now - 50, "alert", message="disk\talmost full", severity="critical"),
    ]))
    await send(hub_dir, bundles / "dev-a2", Batch(base=0, last=1, settled=True, events=[
        ev(1, now - 30, "alert", message="CPU hot", severity="warning")]))

    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    alerts = json.loads(out)["alerts"]
    assert [(a["device"], a["severity"], a["message"], a["seq"], a["count"]) for a in alerts] == [
        ("dev-a2", "warning", "CPU hot", 1, 1),
        ("dev-a1", "critical", "disk\talmost full", 6, 1),
        ("dev-a1", "warning", "CPU hot", 3, 2),
    ]
    assert abs(alerts[0]["ts"] - (now - 30)) < 1e-3

    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert code == 0, err
    needs = out[out.index("needs a person:"):]
    assert "alerts (warning and critical, latest per device and message, last 24 h): 3" in needs
    assert "dev-a1  critical: disk almost full\n" in needs
    assert "dev-a1  warning: CPU hot  (2 times)\n" in needs
    assert "dev-a2  warning: CPU hot\n" in needs
    assert "fan stalled" not in needs
    assert "booted" not in needs

    # `edge-hub events` shows an alert the same way.
    code, out, err = await run_cli(HUB, "events", "--dir", str(hub_dir.dir), "--device", "dev-a2")
    assert code == 0, err
    assert out.rstrip().endswith("\talert\t-\twarning: CPU hot")
