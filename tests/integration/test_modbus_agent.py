"""A real agent process with a Modbus sensor declared in its agent.toml, a real hub, and a real pymodbus
server: readings reach the hub exactly once, a rule on a field value writes a coil (audited), health
travels in the status and in events, bad declarations are refused at start, `edge-agent check` probes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from edgefleet.wire.protocol import STATUS, Status, unpack, up_topic
from tests.integration.test_store_forward_input import hub_query
from tests.support.exactly_once import QUIET, assert_exactly_once, wait_drained
from tests.support.harness import AGENT, HUB, HubDir, Proc, hub_tap, run_cli, start_agent
from tests.support.modbus import ModbusServer, wait_for

SETTLE = 60.0  # a hub round trip on a loaded machine
POLICY = """\
[[rules]]
name = "overvoltage"
when = "plc.voltage > 225"
clear = "plc.voltage < 220"
action = "modbus_write"
args = { point = "plc.relay", value = 1 }
offline = "act"
"""


def declare(bundle: Path, url: str, *, registers: str | None = None, unit: int = 1) -> Path:
    """The device's own agent.toml gets a Modbus sensor, a writable coil and a local policy."""
    config = bundle / "agent.toml"
    registers = registers or ('[{ name = "voltage", table = "input", address = 0, scale = 0.1 }, '
                              '{ name = "relay", table = "coil", address = 0 }]')
    (bundle / "local-policy.toml").write_text(POLICY, encoding="utf-8")
    text = config.read_text(encoding="utf-8")
    config.write_text(f'policy = "local-policy.toml"\n{text}\n[actuators]\nmodbus = ["plc.relay"]\n\n'
                      f'[[sensors]]\nkind = "modbus"\nname = "plc"\nurl = "{url}"\nunit = {unit}\n'
                      f'interval_s = 0.2\ntimeout_s = 0.5\nregisters = {registers}\n', encoding="utf-8")
    return config


async def coil(server: ModbusServer, unit: int = 1) -> bool:
    client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=5, retries=0)
    try:
        assert await client.connect()
        return bool((await client.read_coils(0, count=1, device_id=unit)).bits[0])
    finally:
        client.close()


async def test_field_readings_reach_the_hub_exactly_once_and_a_rule_writes_a_coil(
        hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path) -> None:
    await hub_dir.provision(bundles, "dev-m")
    bundle = bundles / "dev-m"
    server = ModbusServer(workdir, {"units": {"1": {"input": [2301], "coil": [False]}}})
    await server.start()
    config = declare(bundle, server.url)
    agent = await start_agent(config, *QUIET, "report.default_deadband=0", "uplink.status_interval=1",
                              name="dev-m")
    try:
        await hub.wait_for(r"device dev-m is online")
        # The rule fires on the first reading over 225 V and writes the coil (the device is asked:
        # nothing announces a write).
        async with asyncio.timeout(SETTLE):
            while True:
                if await coil(server):
                    break
                await asyncio.sleep(0.2)
        await wait_for(lambda: len(hub_query(hub_dir, "SELECT 1 FROM telemetry WHERE metric = 'plc.voltage'")) >= 5,
                       "five plc.voltage readings at the hub", SETTLE)
        async with hub_tap(hub_dir, hub, [up_topic("dev-m", STATUS)]) as tap, asyncio.timeout(SETTLE):
            status = unpack((await tap.next_message()).payload, Status)
        _, local, _ = await run_cli(AGENT, "status", "--config", str(config), "--json", timeout=60)
        server.kill()  # the device goes silent: the outbox can drain to a fixed point
        await agent.wait_for(r"field sensor plc is failing", timeout=SETTLE)
        final = await wait_drained(hub_dir.dir, bundle, timeout=SETTLE)
        assert await agent.stop() == 0, "\n".join(agent.lines[-30:])
    finally:
        await agent.stop()
        await server.stop()
    assert_exactly_once(hub_dir.dir, "dev-m", final.last_seq, final.dropped)
    values = {v for (v,) in hub_query(hub_dir, "SELECT value FROM telemetry WHERE metric = 'plc.voltage'")}
    assert values == {2301 * 0.1}
    assert status.field_sensors["plc"].state == "ok"
    assert status.field_sensors["plc"].reads >= 1
    on_device = json.loads(local)["field_sensors"]["sensors"]["plc"]  # edge-agent status, while it ran
    assert (on_device["state"], on_device["kind"]) == ("ok", "modbus")
    events = [(kind, json.loads(body)) for kind, body in
              hub_query(hub_dir, "SELECT kind, body FROM events WHERE device = 'dev-m' ORDER BY seq")]
    started = [body for kind, body in events if kind == "action_started"]
    assert started[0]["args"] == {"point": "plc.relay", "value": 1}  # audited before the write, with the value
    outcome = [body for kind, body in events if kind in ("action_succeeded", "action_failed")]
    assert "wrote 1 to plc.relay (coil 0 of unit 1)" in outcome[0]["detail"]
    failing = [body for kind, body in events if kind == "sensor_failing"]
    assert len(failing) == 1
    assert failing[0]["sensor"] == "plc"
    _, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert "field sensors failing (the device's latest word on each): 1" in out, out + err
    assert "dev-m  plc:" in out


async def test_a_bad_declaration_is_refused_at_start_naming_the_file_the_key_and_the_fix(
        hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-x")
    overlapping = ('[{ name = "voltage", table = "holding", address = 0, type = "float32" }, '
                   '{ name = "current", table = "holding", address = 1 }]')
    config = declare(bundles / "dev-x", "tcp://127.0.0.1:1502", registers=overlapping)
    code, out, err = await run_cli(AGENT, "run", "--config", str(config), timeout=30)
    assert code == 2, out + err
    assert f"{config}: sensors[0].registers[1] (current) overlaps holding 1 with voltage" in err
    assert "give each value its own addresses" in err
    assert "Traceback" not in err


async def test_check_probes_each_field_sensor(hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    await hub_dir.provision(bundles, "dev-c", "dev-d")
    async with ModbusServer(workdir, {"units": {"1": {"input": [2301], "coil": [True]}, "2": {"input": [1]}},
                                      "dead": [2]}) as server:
        good = declare(bundles / "dev-c", server.url)
        dead = declare(bundles / "dev-d", server.url, unit=2)
        _, out_good, _ = await run_cli(AGENT, "check", "--config", str(good), timeout=60)
        _, out_dead, _ = await run_cli(AGENT, "check", "--config", str(dead), timeout=60)
    assert "ok    sensor plc: read 2 value(s): plc.voltage = 230.1, plc.relay = 1." in out_good, out_good
    assert f"FAIL  sensor plc: unit 2 did not answer within 0.5 s on tcp://127.0.0.1:{server.port}" in out_dead, \
        out_dead
