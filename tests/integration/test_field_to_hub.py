"""Field readings from a local MQTT broker, a kernel-shaped sysfs tree and an exec program reach
the hub exactly once, like any reading: a real agent, hub, managed Mosquitto and a LAN Mosquitto,
ending with the exactly-once check over every sequence number, and each value counted at the hub."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import psutil
import pytest

from edge_agent.sense.field.base import SensorHealth
from edge_agent.sense.field.mqtt_local import Endpoint, LocalMqtt, TopicMap
from tests.integration.test_rules_integration import hub_events
from tests.integration.test_store_forward_faults import settle, stop_cleanly, wait_until
from tests.support.exactly_once import QUIET
from tests.support.field import Collected
from tests.support.harness import AGENT, HubDir, Proc
from tests.support.local_broker import local_broker

pytestmark = pytest.mark.integration

FAST = ("report.default_deadband=0", "uplink.ack_timeout=3", "uplink.status_interval=1",
        "broker.keepalive=2", "broker.connect_timeout=3")
ARRIVE_TIMEOUT = 60.0  # agent start, first polls and batches on a loaded 2-core machine
EXEC_LINES = 10
MQTT_MESSAGES = 5

PROGRAM = f"""\
import sys, time
print("not a reading", flush=True)  # refused, counted; the rest goes on
for i in range({EXEC_LINES}):
    print('{{"ts": %d, "count": %d}}' % (1700000000 + i, i), flush=True)
sys.stderr.write("scanner: done\\n")
time.sleep(3600)
"""


def hwmon_tree(sys_root: Path) -> None:
    """One hwmon chip (sht3x) laid out as the kernel does: the class folder links to the device."""
    device = sys_root / "devices/platform/soc/i2c-1/1-0044/hwmon/hwmon0"
    device.mkdir(parents=True)
    (device / "name").write_text("sht3x\n")
    (device / "temp1_input").write_text("21375\n")
    (device / "humidity1_input").write_text("45250\n")
    (sys_root / "class/hwmon").mkdir(parents=True)
    (sys_root / "class/hwmon/hwmon0").symlink_to("../../devices/platform/soc/i2c-1/1-0044/hwmon/hwmon0")


def field_sensors(sys_root: Path, program: Path, mqtt_port: int) -> str:
    return f"""
[[sensors]]
kind = "sysfs"
name = "room"
source = "hwmon"
device = "sht3x"
root = "{sys_root}"
interval_s = 0.5

[[sensors]]
kind = "exec"
name = "ble"
argv = ["{sys.executable}", "-u", "{program}"]

[[sensors]]
kind = "mqtt"
name = "zb"
port = {mqtt_port}
topics = [{{ topic = "zigbee2mqtt/+", points = {{ power = "power" }}, ts_field = "ts", ts_unit = "s" }}]
"""


def running(program: Path) -> list[int]:
    """Live (not zombie) processes whose command line names `program`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if str(program) in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def agent_argv(bundle: Path, *extra: str) -> list[str]:
    sets = [a for o in (*FAST, *extra) for a in ("--set", o)]
    return [AGENT, "run", "--config", str(bundle / "agent.toml"), "--log-level", "debug", *sets]


def hub_values(hub_dir: HubDir, device: str, metric: str) -> list[tuple[float, float]]:
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT ts, value FROM telemetry WHERE device = ? AND metric = ? ORDER BY ts",
                          (device, metric)).fetchall()
    finally:
        db.close()
    return [(float(ts), float(value)) for ts, value in rows]


async def test_mqtt_sysfs_and_exec_readings_reach_the_hub_exactly_once(
    hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path,
) -> None:
    device = "dev-field"
    await hub_dir.provision(bundles, device)
    bundle = bundles / device
    sys_root = workdir / "sys"
    hwmon_tree(sys_root)
    program = workdir / "scanner.py"
    program.write_text(PROGRAM)
    config = bundle / "agent.toml"
    plain = config.read_text()
    async with local_broker(workdir / "lan") as lan:
        config.write_text(plain + field_sensors(sys_root, program, lan.port))
        agent = await Proc("agent", agent_argv(bundle, *QUIET)).start()
        try:
            await agent.wait_for(rf"{device} online", timeout=ARRIVE_TIMEOUT)
            await agent.wait_for(r"zb: subscribed to zigbee2mqtt/\+", timeout=ARRIVE_TIMEOUT)
            for i in range(MQTT_MESSAGES):
                await lan.publish(f"zigbee2mqtt/plug{i % 2}", f'{{"power": {100 + i}, "ts": {1700000100 + i}}}')
            await lan.publish("zigbee2mqtt/plug0", '{"power": "NaN", "ts": 1700000200}')  # refused, counted

            def arrived() -> bool:
                return (len(hub_values(hub_dir, device, "ble.count")) >= EXEC_LINES
                        and len(hub_values(hub_dir, device, "zb.power")) >= MQTT_MESSAGES
                        and len(hub_values(hub_dir, device, "room.temp1")) >= 3)

            await wait_until(arrived, "every field reading at the hub", ARRIVE_TIMEOUT)
            await stop_cleanly(agent)
        finally:
            await agent.stop()
    assert any("scanner: done" in line for line in agent.lines)  # the program's stderr, in the agent's log
    assert not running(program)  # the clean stop took the program with it
    # The quiet run that drains what the clean stop committed, without the field sensors (the
    # program would print its lines again); then the exactly-once check over every seq.
    config.write_text(plain)
    await settle(hub_dir, bundle, agent_argv(bundle, *QUIET))

    assert hub_values(hub_dir, device, "ble.count") == [(1700000000.0 + i, float(i)) for i in range(EXEC_LINES)]
    assert hub_values(hub_dir, device, "zb.power") == [(1700000100.0 + i, 100.0 + i) for i in range(MQTT_MESSAGES)]
    temps = hub_values(hub_dir, device, "room.temp1")
    assert {value for _, value in temps} == {21.375}
    assert len({ts for ts, _ in temps}) == len(temps)  # no reading twice
    assert {value for _, value in hub_values(hub_dir, device, "room.humidity1")} == {45.25}


POLICY = """\
version = 3

[[rules]]
name = "pump-on"
when = "zb.power > 150"
clear = "zb.power < 50"
action = "mqtt_publish"
args = { sensor = "zb", topic = "zigbee2mqtt/pump/set", payload = '{"state": "ON"}' }
offline = "act"
"""


async def test_a_rule_on_a_zigbee_reading_publishes_to_the_lan_broker_audited_at_the_hub(
    hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path,
) -> None:
    device = "dev-pump"
    await hub_dir.provision(bundles, device)
    bundle = bundles / device
    (bundle / "policy.toml").write_text(POLICY)
    config = bundle / "agent.toml"
    plain = config.read_text()
    async with local_broker(workdir / "lan") as lan:
        config.write_text(plain + f"""
[actuators]
mqtt_topics = ["zigbee2mqtt/pump/set"]

[[sensors]]
kind = "mqtt"
name = "zb"
port = {lan.port}
topics = [{{ topic = "zigbee2mqtt/plug", points = {{ power = "power" }} }}]
""")
        watcher = LocalMqtt("watch", Endpoint("127.0.0.1", lan.port), [TopicMap("zigbee2mqtt/pump/set",
                                                                                {"on": "state"})])
        seen = Collected()
        watching = asyncio.create_task(watcher.run(SensorHealth("watch", "mqtt", lambda kind, body: None), seen))
        agent = await Proc("agent", agent_argv(bundle, *QUIET, 'policy="policy.toml"')).start()
        try:
            async with asyncio.timeout(ARRIVE_TIMEOUT):
                await watcher.link.connected.wait()
            await agent.wait_for(r"zb: subscribed to zigbee2mqtt/plug", timeout=ARRIVE_TIMEOUT)
            await lan.publish("zigbee2mqtt/plug", '{"power": 230}')
            await agent.wait_for(r"mqtt_publish finished", timeout=ARRIVE_TIMEOUT)
            await wait_until(lambda: watcher.messages >= 1, "the LAN broker delivers the command", ARRIVE_TIMEOUT)
            await stop_cleanly(agent)
        finally:
            await agent.stop()
            watching.cancel()
            await asyncio.wait([watching])
    config.write_text(plain)
    await settle(hub_dir, bundle, agent_argv(bundle, *QUIET))
    events = [e for e in await hub_events(hub_dir, device) if e.get("rule") == "pump-on"]
    kinds = [e["kind"] for e in events]
    assert watcher.messages == 1  # one command, published once
    assert kinds[-2:] == ["action_started", "action_succeeded"], kinds
    started, succeeded = events[-2], events[-1]
    assert started["body"]["args"]["payload"] == '{"state": "ON"}'  # the value, audited before the write
    assert "published 15 bytes to zigbee2mqtt/pump/set on zb's broker" in succeeded["body"]["detail"]
