"""`edge-agent check` probes the sysfs, exec and local MQTT sensors of agent.toml: one read each,
or one sentence on what is wrong (real agent CLI, real hub, a LAN Mosquitto, a kernel-shaped tree)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.integration.test_check import check
from tests.integration.test_field_to_hub import hwmon_tree
from tests.support.harness import HubDir, Proc
from tests.support.local_broker import local_broker

pytestmark = pytest.mark.integration


def sensors(sys_root: Path, program: Path, mqtt_port: int, w1: str) -> str:
    return f"""
[[sensors]]
kind = "sysfs"
name = "room"
source = "hwmon"
device = "sht3x"
root = "{sys_root}"

[[sensors]]
kind = "sysfs"
name = "tank"
source = "w1"
device = "{w1}"
root = "{sys_root}"

[[sensors]]
kind = "exec"
name = "ble"
argv = ["{sys.executable}", "{program}"]

[[sensors]]
kind = "mqtt"
name = "zb"
port = {mqtt_port}
topics = [{{ topic = "shellies/plug/power", points = {{ power = "" }} }}]
"""


async def test_check_reads_each_field_sensor_once_or_says_why_not(hub_dir: HubDir, hub: Proc, bundles: Path,
                                                                   workdir: Path) -> None:
    await hub_dir.provision(bundles, "dev-check")
    config = bundles / "dev-check" / "agent.toml"
    plain = config.read_text()
    sys_root = workdir / "sys"
    hwmon_tree(sys_root)
    program = workdir / "scan.py"
    program.write_text("print('rssi=oops')\n")  # exits after one line that is not a reading
    async with local_broker(workdir / "lan") as lan:
        await lan.publish("shellies/plug/power", "230.5", retain=True)
        config.write_text(plain + sensors(sys_root, program, lan.port, "28-0000deadbeef"))
        report = await check(config)
    assert report.code == 1, report
    assert report.failed() == {"sensor tank", "sensor ble"}, report
    assert report.findings["sensor room"] == (True, "read 2 value(s): room.humidity1 = 45.25, room.temp1 = 21.375.")
    assert report.findings["sensor zb"] == (True, "read 1 value(s): zb.power = 230.5.")
    assert "no 1-Wire device '28-0000deadbeef'" in report.fail("sensor tank")
    assert "exited with code 0 before printing a reading; its lines did not parse" in report.fail("sensor ble")
