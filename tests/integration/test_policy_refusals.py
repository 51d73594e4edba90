"""Signed policies an agent must refuse, and what it does then — against a real hub and Mosquitto.

A refused policy changes nothing on the device: the agent keeps the policy in force, says
why in its log, records a `policy_refused` event and reports the refusal in its Status, so
the operator sees it in `edge-hub devices --json` and `edge-hub events`. Its rules keep
acting under the version in force, which the audit events at the hub show.

Crafted messages are sent as the hub would: a second MQTT session with the hub's identity
publishes on the device's down/policy topic (see `conftest.hub_tap` for why the hub is paused then).
Every wait is bounded and driven by a log line, or by polling the hub's CLI to a deadline.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edgefleet.wire.envelope import SignedEnvelope
from edgefleet.wire.protocol import POLICY, PolicyDocument, down_topic, pack, unpack
from hub.rollout.signing import seal
from tests.support.harness import HUB, START_TIMEOUT, HubDir, Proc, hub_tap, run_cli, start_agent, start_hub

pytestmark = pytest.mark.integration

T = TypeVar("T")
DEVICE = "dev-pol"
# Five readings a second, every one reported, a Status every second, a lost batch resent after 1 s.
FAST = ("sim.rate_hz=5", "report.default_deadband=0", "uplink.ack_timeout=1", "uplink.status_interval=1")
LOCAL = 'policy="local.toml"'
ARRIVAL = 5.0  # a message through the broker, a PUBACK
WAIT = 20.0  # anything that crosses agent → broker → hub → database (resends included)
POLL = 0.3
RECONNECT = 45.0  # an agent's reconnect backoff after failing for START_TIMEOUT, with a hub starting


def policy_text(rule: str, note: str) -> str:
    """One rule that holds for every sim reading and never clears: with a 1 s cooldown it
    records about once a second for as long as its policy is in force (the limits are raised
    so that it is neither budgeted nor escalated within a test)."""
    return (
        "[limits]\n"
        "max_actions_per_hour = 100000\n"
        "escalate_after_fires_without_clear = 100000\n"
        "\n"
        "[[rules]]\n"
        f'name = "{rule}"\n'
        'when = "sig0 > -1000000"\n'
        'clear = "sig0 < -2000000"\n'
        'action = "record"\n'  # line 9
        f'args = {{ note = "{note}" }}\n'
        'cooldown = "1s"\n'  # line 11
        'offline = "act"\n'
    )


STALE_V1 = r"^version 1 is older than version 2\b.*\(a replay\?\)$"
V1, V2 = policy_text("r1", "v1"), policy_text("r2", "v2")
BROKEN_TOML = V2.replace('cooldown = "1s"', 'cooldown = "1s')  # unterminated string: line 11, column 15
# Fits rpi-4 (system metrics, its allowlisted command), not sim (neither).
MIXED = ('[[rules]]\nname = "m1"\nwhen = "load1 > 1000"\nclear = "load1 < 999"\n'
         'action = "command"\nargs = { argv = ["/usr/bin/vcgencmd", "measure_temp"] }\noffline = "act"\n')
FORBIDDEN = V2.replace('action = "record"\nargs = { note = "v2" }',  # line 9, column 1
                       'action = "command"\nargs = { argv = ["true"] }')


# --- helpers ------------------------------------------------------------------------------


@dataclass
class Fleet:
    """One hub and the agent of DEVICE, running a signed policy from that hub."""

    hub_dir: HubDir
    hub: Proc
    bundle: Path
    agent: Proc

    @property
    def stored(self) -> Path:
        return self.bundle / "state" / "policy.signed"


async def poll(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT) -> T:
    """Call `probe` until it returns something other than None, bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(POLL)


async def hub_cli(hub_dir: HubDir, *argv: str) -> str:
    """`edge-hub ARGV --dir DIR`, which must succeed; its stdout."""
    code, out, err = await run_cli(HUB, *argv, "--dir", str(hub_dir.dir))
    assert code == 0, f"edge-hub {' '.join(argv)}: exit {code}\n{err}"
    return out


async def device_row(hub_dir: HubDir, device: str = DEVICE) -> dict[str, Any]:
    rows = [json.loads(line) for line in (await hub_cli(hub_dir, "devices", "--json")).splitlines()]
    return next(row for row in rows if row["device"] == device)


async def hub_events(hub_dir: HubDir, kind: str, device: str = DEVICE) -> list[dict[str, Any]]:
    out = await hub_cli(hub_dir, "events", "--device", device, "--kind", kind, "--json")
    return [json.loads(line) for line in out.splitlines()]


async def push(hub_dir: HubDir, path: Path) -> None:
    await hub_cli(hub_dir, "policy", "push", str(path))


async def inject(fleet: Fleet, payload: bytes) -> None:
    async with hub_tap(fleet.hub_dir, fleet.hub) as session, asyncio.timeout(ARRIVAL):
        await session.publish(down_topic(DEVICE, POLICY), payload, qos=1, retain=False)


async def retained_policy(fleet: Fleet) -> bytes:
    """The signed policy the broker holds (retained) for DEVICE, exactly as a device gets it."""
    async with hub_tap(fleet.hub_dir, fleet.hub) as session, asyncio.timeout(ARRIVAL):
        await session.subscribe([(down_topic(DEVICE, POLICY), 1)])
        message = await session.next_message()
    assert message.retain
    return message.payload


def policy_key(hub_dir: HubDir) -> Ed25519PrivateKey:
    key = load_pem_private_key((hub_dir.pki / "policy.key").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def document(hub_dir: HubDir, text: str, *, version: int = 2, device: str = DEVICE, profile: str = "sim",
             region: str | None = None) -> PolicyDocument:
    return PolicyDocument(version=version, device=device, profile=profile,
                          region=hub_dir.region if region is None else region, text=text, issued_at=time.time())


def signed(doc: PolicyDocument | bytes, key: Ed25519PrivateKey) -> bytes:
    """What the hub publishes: pack(seal(pack(doc), key)); raw bytes are sealed as they are."""
    return pack(seal(doc if isinstance(doc, bytes) else pack(doc), key))


def outbox_events(bundle: Path, kind: str, since: float) -> list[dict[str, Any]]:
    """Events of `kind` committed in the agent's outbox at or after `since` (wall clock)."""
    path = bundle / "state" / "outbox.db"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT seq, body FROM records WHERE kind = ? AND ts >= ? ORDER BY seq",
                          (kind, since)).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()
    return [{"seq": seq, **json.loads(body)} for seq, body in rows]


async def running(fleet: Fleet, version: int, rule: str, *, after_seq: int = 0) -> dict[str, Any]:
    """Wait for an action_succeeded at the hub with seq > after_seq; it must be `rule` under `version`."""
    async def probe() -> dict[str, Any] | None:
        later = [e for e in await hub_events(fleet.hub_dir, "action_succeeded") if e["seq"] > after_seq]
        return later[0] if later else None

    action = await poll(probe, f"a record action of {DEVICE} at the hub after seq {after_seq}")
    assert (action["policy_version"], action["rule"]) == (version, rule), action
    assert "policy_local" not in action["body"], action  # the signed policy's rule, not a local file's
    return action


async def start_fleet(hub_dir: HubDir, hub: Proc, bundles: Path, *overrides: str) -> Fleet:
    """DEVICE provisioned, version 1 pushed, the agent running it."""
    await hub_dir.provision(bundles, DEVICE)
    bundle = bundles / DEVICE
    (bundle / "v1.toml").write_text(V1)
    (bundle / "local.toml").write_text(policy_text("local", "local"))
    await push(hub_dir, bundle / "v1.toml")
    agent = await start_agent(bundle / "agent.toml", *FAST, *overrides)
    fleet = Fleet(hub_dir, hub, bundle, agent)
    await agent.wait_for(r"policy version 1 applied: 1 rule\(s\)")
    return fleet


async def push_v2(fleet: Fleet) -> None:
    """Once the rollout of version 1 is complete (one rollout at a time), push version 2."""
    await fleet.hub.wait_for(r"rollout 1: version 1 reached all 1 targeted devices", timeout=WAIT)
    (fleet.bundle / "v2.toml").write_text(V2)
    mark = fleet.agent.mark()
    await push(fleet.hub_dir, fleet.bundle / "v2.toml")
    await fleet.agent.wait_for(r"policy version 2 applied: 1 rule\(s\)", after=mark)


@pytest.fixture
async def fleet(hub_dir: HubDir, hub: Proc, bundles: Path) -> AsyncIterator[Fleet]:
    f = await start_fleet(hub_dir, hub, bundles)
    try:
        yield f
    finally:
        await f.agent.stop()


async def assert_refused(fleet: Fleet, payload: bytes, *, version: int, reason: str, detail: str, in_force: int,
                         rule: str) -> dict[str, Any]:
    """Send `payload` as the hub; the agent must refuse it (`detail`: a regex) and carry on.

    Checked where each party shows it: the agent's log, its stored policy, the device row of
    `edge-hub devices --json`, the policy_refused event at the hub, and record actions under
    the version in force that the agent took after the refusal. Returns the device row.
    """
    stored = fleet.stored.read_bytes()
    mark = fleet.agent.mark()
    await inject(fleet, payload)
    await fleet.agent.wait_for(rf"; version {in_force} stays in force\"$", timeout=ARRIVAL, after=mark)
    log = "\n".join(fleet.agent.lines[mark:])
    said = re.search(rf"policy version (\d+) refused \((\w+)\): (.*?); version {in_force} stays in force\"$", log,
                     re.S | re.M)
    assert said is not None, log
    assert (int(said[1]), said[2]) == (version, reason), said[0]
    said_detail = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], said[3])  # logfmt-escaped in the line
    assert re.search(detail, said_detail), f"{said_detail!r} does not match {detail!r}"
    assert not re.search(r"policy version \d+ applied", log)
    assert fleet.stored.read_bytes() == stored, "a refused policy must not replace the stored one"

    async def reported() -> dict[str, Any] | None:
        row = await device_row(fleet.hub_dir)
        refused = row["policy_refused"] or {}
        return row if (refused.get("reason"), refused.get("version")) == (reason, version) else None

    row = await poll(reported, f"{DEVICE} reporting its {reason} refusal in edge-hub devices --json")
    assert row["policy_refused"]["detail"] == said_detail
    assert row["policy_version"] == in_force
    assert row["online"]

    async def event() -> dict[str, Any] | None:
        return next((e for e in await hub_events(fleet.hub_dir, "policy_refused")
                     if e["body"].get("reason") == reason and e["policy_version"] == version), None)

    refusal = await poll(event, f"the policy_refused ({reason}) event of {DEVICE} at the hub")
    assert refusal["body"] == {"reason": reason, "detail": said_detail, "in_force": in_force}

    await running(fleet, in_force, rule, after_seq=refusal["seq"])  # its rules still act, under the old version
    assert fleet.agent.proc is not None
    assert fleet.agent.proc.returncode is None
    return row


# --- 1. refused by the agent, which keeps its last good policy --------------------------------


def tampered(hub_dir: HubDir) -> bytes:
    """A genuine envelope whose payload was changed after signing (same length, still a document)."""
    envelope = unpack(signed(document(hub_dir, V2), policy_key(hub_dir)), SignedEnvelope)
    payload = envelope.payload.replace(b'note = "v2"', b'note = "v9"')
    assert payload != envelope.payload
    return pack(msgspec.structs.replace(envelope, payload=payload))


def other_key(hub_dir: HubDir) -> bytes:
    return signed(document(hub_dir, V2), Ed25519PrivateKey.generate())


def other_key_posing(hub_dir: HubDir) -> bytes:
    """Signed by another key, but claiming the hub's key id: the signature itself must fail."""
    genuine = unpack(signed(document(hub_dir, V1), policy_key(hub_dir)), SignedEnvelope)
    forged = unpack(other_key(hub_dir), SignedEnvelope)
    return pack(msgspec.structs.replace(forged, key_id=genuine.key_id))


CASES = [
    pytest.param(tampered, 0, "bad_signature", r"^signature does not match the payload$", id="tampered"),
    pytest.param(other_key, 0, "bad_signature", r"^signed by unknown key [0-9a-f]{16}$", id="other-key"),
    pytest.param(other_key_posing, 0, "bad_signature", r"^signature does not match the payload$",
                 id="other-key-posing-as-hub-key"),
    pytest.param(lambda h: b"\xa7garbage", 0, "malformed", r"^not a signed envelope \(", id="garbage"),
    pytest.param(lambda h: signed(b"\x93\x01\x02\x03", policy_key(h)), 0, "malformed",
                 r"^signed, but not a policy document \(", id="signed-non-document"),
    pytest.param(lambda h: signed(document(h, BROKEN_TOML), policy_key(h)), 2, "invalid_policy",
                 r"^invalid policy:\n  line 11, column 15: not valid TOML", id="invalid-toml"),
    pytest.param(lambda h: signed(document(h, FORBIDDEN), policy_key(h)), 2, "invalid_policy",
                 r"^invalid policy:\n  line 9, column 1: rule 'r2': action 'command' is not allowed by this "
                 r"device's profile", id="action-the-profile-forbids"),
    pytest.param(lambda h: signed(document(h, V2, device="dev-other"), policy_key(h)), 2, "wrong_device",
                 r"^signed for device 'dev-other', this is 'dev-pol'$", id="other-device"),
    pytest.param(lambda h: signed(document(h, V2, profile="rpi-4"), policy_key(h)), 2, "wrong_profile",
                 r"^signed for profile 'rpi-4', this device runs 'sim'$", id="other-profile"),
]


@pytest.mark.parametrize(("make", "version", "reason", "detail"), CASES)
async def test_refused_policy_leaves_the_last_good_one_running(
    fleet: Fleet, make: Callable[[HubDir], bytes], version: int, reason: str, detail: str
) -> None:
    await assert_refused(fleet, make(fleet.hub_dir), version=version, reason=reason, detail=detail, in_force=1,
                         rule="r1")


async def test_replayed_older_version_is_refused(fleet: Fleet) -> None:
    """The hub's own retained v1, captured from the broker, sent again once v2 is in force."""
    v1 = await retained_policy(fleet)
    assert v1 == fleet.stored.read_bytes()  # what the agent keeps is what it was sent
    await push_v2(fleet)
    row = await assert_refused(fleet, v1, version=1, reason="stale_version", detail=STALE_V1, in_force=2, rule="r2")
    assert row["policy_intended"] == 2


# --- 2. the last good policy survives a restart and kill -9 ------------------------------------


async def test_last_good_policy_survives_restart_and_kill_9(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """v1 then v2 applied, a tampered policy refused; then, with the hub down, the agent is
    stopped and started, and killed (-9) and started: each time it runs v2, the last good
    policy, from its state directory (not its local policy file, which it also has). With the
    hub back, a replay of v1 is still refused: the replay floor survived too. (v2, not v1, is
    the one kept so that an older version exists to replay.)"""
    fleet = await start_fleet(hub_dir, hub, bundles, LOCAL)
    second_hub: Proc | None = None
    try:
        v1 = fleet.stored.read_bytes()
        await push_v2(fleet)
        v2 = fleet.stored.read_bytes()
        await assert_refused(fleet, tampered(hub_dir), version=0, reason="bad_signature",
                             detail="^signature does not match the payload$", in_force=2, rule="r2")

        await hub.stop()
        for ending in ("SIGTERM", "SIGKILL"):
            if ending == "SIGTERM":
                assert await fleet.agent.stop() == 0
            else:
                fleet.agent.signal(signal.SIGKILL)
                assert await fleet.agent.stop() == -signal.SIGKILL
            assert fleet.stored.read_bytes() == v2
            since = time.time()
            fleet.agent = await start_agent(fleet.bundle / "agent.toml", *FAST, LOCAL, name=f"agent-after-{ending}")

            async def acted(since: float = since) -> list[dict[str, Any]] | None:
                return outbox_events(fleet.bundle, "action_succeeded", since)[:2] or None

            actions = await poll(acted, f"record actions after the restart that followed {ending}", START_TIMEOUT)
            assert {(a["policy_version"], a["rule"], a.get("policy_local")) for a in actions} == {(2, "r2", None)}, \
                actions
            said = "\n".join(fleet.agent.lines)
            assert "policy version" not in said, said  # nothing came from the hub: it is down
            assert f"{DEVICE} online" not in said, said

        mark = fleet.agent.mark()  # before the hub starts: the agent may be online before start_hub returns
        second_hub = fleet.hub = await start_hub(hub_dir)
        # The agent has been backing off since it started (hub down): a few seconds at most here.
        await fleet.agent.wait_for(rf"{DEVICE} online", after=mark, timeout=RECONNECT)
        await assert_refused(fleet, v1, version=1, reason="stale_version", detail=STALE_V1, in_force=2, rule="r2")
        assert fleet.stored.read_bytes() == v2
    finally:
        await fleet.agent.stop()
        if second_hub is not None:
            await second_hub.stop()


# --- 3. drift: a device that cannot check signatures -----------------------------------------


async def test_device_without_policy_key_drifts_until_the_key_is_back(hub_dir: HubDir, bundles: Path) -> None:
    """Without policy.pub the agent can check no signature: it refuses (no_policy_key), and with
    drift_grace_s = 1 the hub lists it as drifted and keeps sending its intended version, once
    per grace period; the first resend after policy.pub is back is applied. The apply-failure
    gate is opened (100 %) so that the refusal does not roll the push back: drift is the subject."""
    conf = hub_dir.dir / "hub.toml"
    text = conf.read_text()
    for key, value in (("drift_grace_s", "1"), ("max_apply_failure_pct", "100")):
        text, count = re.subn(rf"(?m)^{key} = \S+", f"{key} = {value}", text)
        assert count == 1, key
    conf.write_text(text)
    await hub_dir.provision(bundles, DEVICE)
    bundle = bundles / DEVICE
    (bundle / "policy.pub").unlink()
    (bundle / "v1.toml").write_text(V1)
    hub = await start_hub(hub_dir)
    agent: Proc | None = None
    try:
        await push(hub_dir, bundle / "v1.toml")
        agent = await start_agent(bundle / "agent.toml", *FAST)
        # The version is the one the envelope claims (unverified: it only tells the hub which push).
        await agent.wait_for(r"policy version 1 refused \(no_policy_key\): cannot read the hub's policy key "
                             r".*policy\.pub: No such file or directory; re-run edge-hub provision for this device "
                             r"to get policy\.pub; version 0 stays in force\"$")
        await hub.wait_for(rf"device {DEVICE} drifted: on version None, intended 1 for \d+ s; sending it again",
                           timeout=WAIT)

        async def drifted() -> dict[str, Any] | None:
            row = await device_row(hub_dir)
            return row if row["policy_drifted"] and row["policy_refused"] else None

        row = await poll(drifted, f"{DEVICE} listed as drifted, with its refusal")
        assert (row["policy_version"], row["policy_intended"]) == (None, 1)
        assert row["policy_refused"]["reason"] == "no_policy_key"
        status = json.loads(await hub_cli(hub_dir, "policy", "status", "--json"))
        assert status["drifted"] == [{"device": DEVICE, "applied": None, "intended": 1}]

        async def event() -> list[dict[str, Any]] | None:
            return await hub_events(hub_dir, "policy_refused") or None

        events = await poll(event, "the no_policy_key refusal event at the hub")
        # Resent every second, refused every time, but reported once: the same refusal is not news.
        assert [(e["policy_version"], e["body"]["reason"]) for e in events] == [(1, "no_policy_key")]
        assert [r["version"] for r in status["refused"]] == [1]

        mark, hub_mark = agent.mark(), hub.mark()
        shutil.copy(hub_dir.pki / "policy.pub", bundle / "policy.pub")
        await hub.wait_for(rf"device {DEVICE} drifted: .*; sending it again", after=hub_mark, timeout=WAIT)
        await agent.wait_for(r"policy version 1 applied: 1 rule\(s\)", after=mark, timeout=WAIT)

        async def caught_up() -> dict[str, Any] | None:
            row = await device_row(hub_dir)
            return row if row["policy_version"] == 1 else None

        row = await poll(caught_up, f"{DEVICE} reporting version 1")
        assert (row["policy_intended"], row["policy_drifted"], row["policy_refused"]) == (1, False, None)
        status = json.loads(await hub_cli(hub_dir, "policy", "status", "--json"))
        assert (status["drifted"], status["refused"]) == ([], [])
        fleet = Fleet(hub_dir, hub, bundle, agent)
        await running(fleet, 1, "r1")
    finally:
        if agent is not None:
            await agent.stop()
        await hub.stop()


# --- 4. the operator's side: validate, and a push nothing is recorded for ---------------------


async def test_validate_and_push_refuse_what_an_agent_would(hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    """No hub needs to run: validate and push work on the hub directory (database and keys).

    MIXED suits an rpi-4 device and not a sim one (no such metric, no such action there): with
    both registered, a push to every device is refused and records nothing; targeted at the
    rpi-4 profile the same file is accepted (and gets version 1: the refused pushes used none)."""
    await hub_dir.provision(bundles, DEVICE)
    await hub_dir.provision(bundles, "dev-rpi", profile="rpi-4")
    texts = {"good": V1, "broken": BROKEN_TOML, "forbidden": FORBIDDEN, "mixed": MIXED}
    files = {name: workdir / f"{name}.toml" for name in texts}
    for name, text in texts.items():
        files[name].write_text(text)

    async def policy_cli(*argv: str) -> tuple[int, str, str]:
        return await run_cli(HUB, "policy", *argv)

    code, out, err = await policy_cli("validate", str(files["broken"]), "--profile", "sim")
    assert (code, out) == (2, ""), err
    assert f"{files['broken']}:11:15: not valid TOML" in err
    assert err.rstrip().endswith(f"{files['broken']}: not valid; nothing was changed")

    code, out, err = await policy_cli("validate", str(files["forbidden"]), "--profile", "sim")
    assert (code, out) == (2, ""), err
    assert (f"{files['forbidden']}:9:1: rule 'r2': action 'command' is not allowed by this device's profile; "
            "allowed: alert, record, set_rate [profile sim]") in err

    for name, profile in (("good", "sim"), ("mixed", "rpi-4")):
        code, out, err = await policy_cli("validate", str(files[name]), "--profile", profile)
        assert (code, out, err) == (0, f"{files[name]}: valid for profile(s) {profile}; 1 rule(s)\n", "")

    errors = {}
    for name, where in (("mixed", ":5:1: rule 'm1': action 'command' is not allowed"),
                        ("forbidden", ":9:1: rule 'r2': action 'command' is not allowed"),
                        ("broken", ":11:15: not valid TOML")):
        code, out, errors[name] = await policy_cli("push", "--dir", str(hub_dir.dir), str(files[name]))
        assert (code, out) == (2, ""), errors[name]
        assert f"{files[name]}{where}" in errors[name]
        assert "nothing was changed" in errors[name]
    assert "[profile sim]" in errors["mixed"]
    assert "[profile rpi-4]" not in errors["mixed"]  # rpi-4 would take it: one refusing profile is enough
    status = json.loads(await hub_cli(hub_dir, "policy", "status", "--json"))
    assert (status["active"], status["rollouts"]) == (None, [])
    assert status["versions"] == {"none": {"intended": 2, "applied": 0}}
    assert (await device_row(hub_dir))["policy_intended"] is None

    code, out, err = await policy_cli("push", "--dir", str(hub_dir.dir), "--target", "profile=rpi-4",
                                      str(files["mixed"]))
    assert code == 0, err
    assert out.startswith("version 1 (rollout 1): 1 of 1 targeted device(s)"), out
    intended = {d: (await device_row(hub_dir, d))["policy_intended"] for d in (DEVICE, "dev-rpi")}
    assert intended == {DEVICE: None, "dev-rpi": 1}


async def test_validate_puts_the_produced_metrics_hint_under_the_unknown_metric(workdir: Path) -> None:
    """MIXED on sim: two unknown-metric problems (lines 3 and 4), then a forbidden action (line 5)."""
    path = workdir / "mixed.toml"
    path.write_text(MIXED)
    code, _, err = await run_cli(HUB, "policy", "validate", str(path), "--profile", "sim")
    assert code == 2, err
    lines = err.splitlines()
    hint = next(i for i, line in enumerate(lines) if "(profile 'sim' produces: sig0, sig1, sig2, sig3)" in line)
    assert "unknown metric 'load1'" in lines[hint - 1], "\n".join(lines)
