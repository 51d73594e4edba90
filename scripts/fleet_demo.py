"""The local fleet demo: a hub with its managed Mosquitto and simulated devices.

Runs the real commands an operator would (edge-hub init / provision / run / devices / events /
policy push / revoke, edge-agent run), prints what happens, and exits 0 when every step
did what it should. One device is a gateway to field devices: a pymodbus server stands in for a
PLC and a LAN Mosquitto with a publisher for a Zigbee sensor behind Zigbee2MQTT; the gateway
reads both, and a rule on the PLC's temperature switches its fan coil.
Usage: python scripts/fleet_demo.py [--devices N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the demo runs from a checkout: share the tests' exactly-once check

from tests.support.exactly_once import account, hub_seqs, outbox_state  # noqa: E402
from tests.support.modbus_server import READY as PLC_READY  # noqa: E402
from tests.support.net import free_port  # noqa: E402

BIN = Path(sys.executable).parent
RATE_HZ = 25  # per signal; 4 signals per sim device
PARTITION_S = 5.0
HUB, AGENT = str(BIN / "edge-hub"), str(BIN / "edge-agent")
STEP_TIMEOUT = 30.0  # generous for a loaded 2-core machine; a healthy run takes about 1 s per step


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def cli(*args: str) -> str:
    done = subprocess.run([HUB, *args], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise SystemExit(f"demo: edge-hub {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def fleet(hub_dir: Path) -> dict[str, dict[str, object]]:
    rows = [json.loads(line) for line in cli("devices", "--dir", str(hub_dir), "--json").splitlines()]
    return {str(r["device"]): r for r in rows}


def events(hub_dir: Path, kind: str) -> list[dict[str, Any]]:
    """What `edge-hub events --kind KIND --json` shows: the devices' audit trail at the hub."""
    out = cli("events", "--dir", str(hub_dir), "--kind", kind, "--json")
    return [json.loads(line) for line in out.splitlines()]


def actions(hub_dir: Path, *, version: int | None = None, action: str | None = None) -> list[dict[str, Any]]:
    """Actions that succeeded, optionally under a signed policy version and of one kind."""
    return [e for e in events(hub_dir, "action_succeeded")
            if (version is None or e["policy_version"] == version)
            and (action is None or e["body"]["action"] == action)]


def wait_until(what: str, check: Callable[[], bool]) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > STEP_TIMEOUT:
            raise SystemExit(f"demo: gave up waiting for {what} after {STEP_TIMEOUT:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - started


# The sim's noise is +-0.05 around a slow sine: a reading this far from its 200 ms average
# is a "spike" every few seconds on every device, and the clear condition re-arms the rule.
SPIKE_WHEN = "abs(sig0 - avg(sig0, 200ms)) > 0.045"
SPIKE_CLEAR = "abs(sig0 - avg(sig0, 200ms)) < 0.005"
LOCAL_POLICY = f"""\
# The local policy in every demo bundle: in force until the hub's first signed policy arrives.
[limits]
max_actions_per_hour = 3600   # the demo's rule acts every few seconds; the default budget is 60

[[rules]]
name = "sig0-spike"
when = "{SPIKE_WHEN}"
clear = "{SPIKE_CLEAR}"
action = "record"
args = {{ note = "sig0 spike" }}
offline = "act"               # keep deciding while the hub is unreachable
"""
GOOD_POLICY = f"""\
# The same decision, signed by the hub for the whole fleet: a spike now raises an alert.
[limits]
max_actions_per_hour = 3600

[[rules]]
name = "sig0-spike"
when = "{SPIKE_WHEN}"
clear = "{SPIKE_CLEAR}"
action = "alert"
args = {{ message = "sig0 spike", severity = "info" }}
offline = "act"
"""
BAD_POLICY = """\
# Broken on purpose: set_rate of a sensor that does not exist fails every second.
[[rules]]
name = "broken"
when = "sig0 > -1000"
clear = "sig0 < -2000"
action = "set_rate"
args = { sensor = "no-such-sensor", interval_s = 1 }
cooldown = "1s"
offline = "act"
"""


# The gateway device's field devices: a PLC on Modbus TCP (holding 0: temperature in 0.1 °C,
# coil 0: the fan) and a Zigbee sensor whose bridge publishes JSON on a LAN broker.
PLC_COLD, PLC_HOT = 450, 650  # 45.0 and 65.0 °C
FIELD_RULE = """
[[rules]]
name = "plc-overheat"
when = "plc.temperature > 60"
clear = "plc.temperature < 55"
action = "modbus_write"
args = { point = "plc.fan", value = 1 }
offline = "act"
"""
FIELD_SENSORS = """
[actuators]
modbus = ["plc.fan"]          # the only point a rule may write

[[sensors]]
kind = "modbus"
name = "plc"
url = "tcp://127.0.0.1:{plc_port}"
interval_s = 0.5
registers = [{{ name = "temperature", table = "holding", address = 0, scale = 0.1 }},
             {{ name = "fan", table = "coil", address = 0 }}]

[[sensors]]
kind = "mqtt"
name = "zigbee"
port = {lan_port}
topics = [{{ topic = "zigbee2mqtt/greenhouse", points = {{ temperature = "temperature", humidity = "humidity" }} }}]
"""
LAN_BROKER = "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
# What Zigbee2MQTT would publish for a temperature/humidity sensor, twice a second.
ZIGBEE_CODE = """\
import json, math, sys, time
import paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="zigbee2mqtt")
client.connect("127.0.0.1", int(sys.argv[1]))
client.loop_start()
for tick in range(10**9):
    body = {"temperature": round(21 + math.sin(tick / 20), 2), "humidity": 48, "linkquality": 120}
    client.publish("zigbee2mqtt/greenhouse", json.dumps(body), qos=1)
    time.sleep(0.5)
"""


def plc(port: int, write: int | None = None) -> bool:
    """Read (after writing `write` to the temperature register) the PLC's fan coil, as a SCADA would."""
    from pymodbus.client import ModbusTcpClient  # only the demo's PLC side needs it

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    try:
        if not client.connect():
            raise SystemExit(f"demo: the PLC stand-in on port {port} does not answer")
        if write is not None:
            client.write_register(0, write, device_id=1)
        return bool(client.read_coils(0, count=1, device_id=1).bits[0])
    finally:
        client.close()


def latest(hub_dir: Path, device: str, metric: str) -> float | None:
    out = cli("telemetry", "--dir", str(hub_dir), "--device", device, "--metric", metric, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    return float(rows[-1]["value"]) if rows else None


def show_field_devices(hub_dir: Path, gateway: str, plc_port: int) -> None:
    """The gateway reads the PLC and the Zigbee sensor; heat the PLC and watch a rule switch its fan."""
    took = wait_until("field readings at the hub", lambda: all(
        latest(hub_dir, gateway, m) is not None for m in ("plc.temperature", "zigbee.temperature")))
    print(f"{gateway} reads the PLC (Modbus TCP) and the Zigbee sensor (local MQTT); at the hub after "
          f"{took:.1f} s: plc.temperature {latest(hub_dir, gateway, 'plc.temperature'):g} °C, zigbee.temperature "
          f"{latest(hub_dir, gateway, 'zigbee.temperature'):g} °C, zigbee.humidity "
          f"{latest(hub_dir, gateway, 'zigbee.humidity'):g} % (edge-hub telemetry)")
    print(f"the PLC heats up: its temperature register goes from {PLC_COLD / 10:g} to {PLC_HOT / 10:g} °C; "
          f"fan coil {'on' if plc(plc_port, write=PLC_HOT) else 'off'}")
    took = wait_until("the fan switched on", lambda: plc(plc_port))
    wait_until("the write audited at the hub", lambda: bool(actions(hub_dir, action="modbus_write")))
    done = actions(hub_dir, action="modbus_write")[0]
    started = next(e for e in events(hub_dir, "action_started")
                   if e["device"] == done["device"] and e["rule"] == "plc-overheat")
    print(f"{took:.1f} s later the PLC's fan coil reads on: rule {done['rule']} on {gateway} wrote it")
    print(f"audit at the hub: action_started {json.dumps(started['body']['args'])} (before the write), then "
          f"action_succeeded: {done['body']['detail']}")


def latest_rollout(hub_dir: Path) -> dict[str, Any]:
    status = json.loads(cli("policy", "status", "--dir", str(hub_dir), "--json"))
    return dict(status["rollouts"][0]) if status["rollouts"] else {}


def show_local_decisions(hub_dir: Path, devices: list[str]) -> None:
    """Wait until every device has acted on its local rule; show one decision and the latencies."""
    took = wait_until("a decision from every device",
                      lambda: {e["device"] for e in actions(hub_dir, action="record")} >= set(devices))
    local = actions(hub_dir, action="record")
    first = min(local, key=lambda e: e["ts"])
    fired = max((e for e in events(hub_dir, "rule_fired")  # the firing that led to this action
                 if e["device"] == first["device"] and e["seq"] < first["seq"]), key=lambda e: e["seq"])
    readings = ", ".join(f"{k}={v:.3f}" for k, v in fired["body"]["readings"].items())
    print(f"{first['device']} decided on its own: rule {first['rule']} fired at {readings} and ran "
          f"{first['body']['action']} {first['body']['latency_ms']:.1f} ms after the sample arrived")
    latencies = sorted(e["body"]["latency_ms"] for e in local)
    print(f"every device decided within {took:.1f} s; decision latency median "
          f"{latencies[len(latencies) // 2]:.1f} ms, max {latencies[-1]:.1f} ms (edge-hub events)")


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the local edgefleet demo and exit.")
    parser.add_argument("--devices", type=int, default=5, help="simulated devices (default 5)")
    parser.add_argument("--keep", type=Path, help="keep the hub and bundles in this folder")
    args = parser.parse_args()

    root = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)  # Mosquitto, started as root, drops to 'mosquitto' and must reach its files
    hub_dir, bundles = root / "hub", root / "bundles"
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    devices = [f"sim-{i:02d}" for i in range(1, args.devices + 1)]
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, argv: list[str]) -> None:
        with (logs / f"{name}.log").open("ab") as log:
            procs[name] = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    try:
        port = free_port()
        say(f"edge-hub init: fleet CA, keys, Mosquitto config (port {port})")
        cli("init", "--dir", str(hub_dir), "--region", "demo", "--port", str(port))
        say(f"edge-hub provision: {len(devices)} device bundles (profile sim)")
        print(cli("provision", "--dir", str(hub_dir), "--out", str(bundles), "--profile", "sim",
                  "--tag", "site=demo-lab", *devices).strip())
        for device in devices:
            (bundles / device / "policy.toml").write_text(LOCAL_POLICY)
        print(f"each bundle also holds a local policy.toml: rule sig0-spike, when {SPIKE_WHEN} → record")

        gateway = devices[1 % len(devices)]  # not the one the demo kills, nor the one it revokes
        say(f"field devices for {gateway}: a PLC (pymodbus server) and a Zigbee sensor (LAN Mosquitto)")
        plc_port, lan_port = free_port(), free_port()
        layout = root / "plc.json"
        layout.write_text(json.dumps({"units": {"1": {"holding": [PLC_COLD], "coil": [False]}}}))
        spawn("plc", [sys.executable, "-m", "tests.support.modbus_server", str(layout), "--tcp",
                      f"127.0.0.1:{plc_port}"])
        (root / "lan-mosquitto.conf").write_text(LAN_BROKER.format(port=lan_port))
        spawn("lan-broker", ["mosquitto", "-c", str(root / "lan-mosquitto.conf")])
        wait_until("the PLC and the LAN broker", lambda: PLC_READY in (logs / "plc.log").read_text(errors="replace")
                   and " running" in (logs / "lan-broker.log").read_text(errors="replace"))
        spawn("zigbee", [sys.executable, "-c", ZIGBEE_CODE, str(lan_port)])
        with (bundles / gateway / "agent.toml").open("a") as config:
            config.write(FIELD_SENSORS.format(plc_port=plc_port, lan_port=lan_port))
        (bundles / gateway / "policy.toml").write_text(LOCAL_POLICY + FIELD_RULE)
        print(f"PLC on 127.0.0.1:{plc_port} (holding 0: temperature, coil 0: fan); Zigbee2MQTT stand-in "
              f"publishing zigbee2mqtt/greenhouse on 127.0.0.1:{lan_port}")
        print(f"{gateway}'s agent.toml declares both ([[sensors]] plc and zigbee) and lets rules write plc.fan; "
              "its policy adds rule plc-overheat: when plc.temperature > 60 → modbus_write plc.fan = 1")

        say("edge-hub run: managed Mosquitto with mutual TLS, and the hub service")
        spawn("hub", [HUB, "run", "--dir", str(hub_dir)])
        # Devices that publish before the hub has subscribed wait out a resend (15 s) for their
        # first acknowledgment: in the field the hub is up long before its devices, so here too.
        took = wait_until("the hub to subscribe", lambda: "hub ready" in (logs / "hub.log").read_text(errors="replace"))
        print(f"hub ready after {took:.1f} s")
        say("edge-agent run: every device connects with its own certificate")
        agent_args = ["--set", "broker.keepalive=5", "--set", f"sim.rate_hz={RATE_HZ}",
                      "--set", "report.default_deadband=0", "--set", "uplink.status_interval=1",
                      "--set", "policy=policy.toml"]
        for device in devices:
            spawn(device, [AGENT, "run", "--config", str(bundles / device / "agent.toml"), *agent_args])
        took = wait_until("every device online", lambda: all(r["online"] for r in fleet(hub_dir).values()))
        print(f"{len(devices)} devices online after {took:.1f} s")
        print(cli("devices", "--dir", str(hub_dir)).rstrip())

        say(f"streaming: {len(devices)} devices x 4 signals x {RATE_HZ} Hz, every reading kept")
        took = wait_until("readings at the hub", lambda: all(hub_seqs(hub_dir, d) for d in devices))
        print(f"readings arriving from every device after {took:.1f} s")

        say("a local decision: each device runs its rule on its own readings; the hub only hears of it")
        show_local_decisions(hub_dir, devices)

        say(f"a field decision: {gateway} acts on its PLC's value and writes a coil")
        show_field_devices(hub_dir, gateway, plc_port)

        say(f"partition: the hub and its broker go away for {PARTITION_S:.0f} s; devices keep buffering")
        procs["hub"].terminate()
        procs["hub"].wait(timeout=30)
        hub_gone = time.time()
        time.sleep(PARTITION_S)  # the partition itself: devices sample and buffer meanwhile
        states = {d: outbox_state(bundles / d) for d in devices}
        hub_back = time.time()
        print(f"{sum(s.rows for s in states.values())} readings waiting in the devices' outboxes")
        spawn("hub", [HUB, "run", "--dir", str(hub_dir)])
        # Drained: everything buffered during the partition is acknowledged (the stream goes on).
        took = wait_until("the backlog to drain",
                          lambda: all(outbox_state(bundles / d).acked >= s.last_seq for d, s in states.items()))
        print(f"link back: backlog drained and acknowledged in {took:.1f} s")
        offline = [e for e in actions(hub_dir) if hub_gone <= e["ts"] <= hub_back]
        print(f"{len(offline)} actions decided on {len({e['device'] for e in offline})} devices while the hub "
              "was away (offline = \"act\"); their audit reached it afterwards")

        crashed = devices[0]
        say(f"kill -9 {crashed}: the broker publishes its Last Will")
        procs[crashed].send_signal(signal.SIGKILL)
        took = wait_until(f"{crashed} offline", lambda: fleet(hub_dir)[crashed]["online"] is False)
        print(f"{crashed} shown offline {took:.1f} s after the crash")
        spawn(crashed, [AGENT, "run", "--config", str(bundles / crashed / "agent.toml"), *agent_args])
        took = wait_until(f"{crashed} back", lambda: fleet(hub_dir)[crashed]["online"] is True)
        print(f"{crashed} restarted and back online after {took:.1f} s")

        say("policy rollout: signed per device, a canary cohort first, then growing waves")
        policies = root / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "good.toml").write_text(GOOD_POLICY)
        (policies / "bad.toml").write_text(BAD_POLICY)
        print(cli("policy", "push", "--dir", str(hub_dir), str(policies / "good.toml"),
                  "--canary", "20", "--bake", "1s").splitlines()[0])
        took = wait_until("the rollout to complete", lambda: latest_rollout(hub_dir).get("state") == "complete")
        good = latest_rollout(hub_dir)["version"]
        on_good = sum(r["policy_version"] == good for r in fleet(hub_dir).values())
        print(f"version {good} reached {on_good} of {len(devices)} devices through the waves in {took:.1f} s")
        wait_until(f"an alert under version {good}", lambda: bool(actions(hub_dir, version=good, action="alert")))
        alerted = actions(hub_dir, version=good, action="alert")
        print(f"under version {good} a spike raises an alert instead of a record: {len(alerted)} so far, "
              f"from {len({e['device'] for e in alerted})} devices")
        say("a bad policy (its action fails): the health gates roll it back by themselves")
        print(cli("policy", "push", "--dir", str(hub_dir), str(policies / "bad.toml"),
                  "--canary", "20", "--bake", "60s").splitlines()[0])
        took = wait_until("the automatic rollback", lambda: latest_rollout(hub_dir).get("state") == "rolled_back")
        bad = latest_rollout(hub_dir)
        saw_bad = [d for d in devices if f"policy version {bad['version']} applied" in
                   (logs / f"{d}.log").read_text(errors="replace")]
        print(f"version {bad['version']} rolled back after {took:.1f} s: {bad['reason']}")
        print(f"devices that ever ran it: {len(saw_bad)} (the canary {', '.join(saw_bad)}); "
              f"the other {len(devices) - len(saw_bad)} never received it")
        if len(saw_bad) != 1:
            print("demo: FAILED — the bad policy went beyond its canary", file=sys.stderr)
            return 1

        revoked = devices[-1]
        say(f"edge-hub revoke {revoked}: CRL re-issued, broker reloaded, live session closed")
        print(cli("revoke", "--dir", str(hub_dir), revoked).strip())
        took = wait_until(f"{revoked} offline", lambda: fleet(hub_dir)[revoked]["online"] is False)
        print(f"{revoked} is offline and its certificate is refused ({took:.1f} s)")

        say("summary")
        for device in devices:
            procs[device].terminate()
            procs[device].wait(timeout=30)
        books = [account(hub_dir, bundles / d) for d in devices]
        taken, at_hub = sum(b.taken for b in books), sum(b.at_hub for b in books)
        waiting, lost = sum(b.waiting for b in books), sum(b.lost for b in books)
        duplicated = sum(b.duplicated for b in books)
        print(f"readings taken: {taken}; at the hub: {at_hub}; still in outboxes: {waiting} "
              f"(sent on the next start); lost: {lost}; duplicated: {duplicated}")
        rows = fleet(hub_dir)
        print(f"devices registered: {len(rows)}; revoked: 1 ({revoked}); mutual TLS everywhere")
        decided = actions(hub_dir)
        print(f"decisions audited at the hub: {len(decided)} actions ({len(offline)} while it was away), "
              "in the readings' exactly-once sequence")
        if lost or duplicated:
            print("demo: FAILED — readings were lost or duplicated", file=sys.stderr)
            return 1
        print("demo: OK")
        return 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"\nhub, bundles and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.umask(0o022)
    raise SystemExit(main())
