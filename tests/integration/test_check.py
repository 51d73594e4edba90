"""`edge-agent check`, and an agent that started with a wrong clock — real processes.

Clocks are faked with libfaketime: the `faketime` wrapper for one-shot checks, and
LD_PRELOAD with a timestamp file for a running agent whose clock gets fixed under it.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.harness import AGENT, HUB, HubDir, Proc, free_port, run_cli

pytestmark = pytest.mark.integration

FAKETIME = shutil.which("faketime")
needs_faketime = pytest.mark.skipif(FAKETIME is None, reason="the faketime command (libfaketime) is not installed")
LINE = re.compile(r"^(ok  |FAIL)  ([^:]+): (.*)$")
# The agent's reconnect backoff is capped at 60 s; an operator expects a connection soon
# after the clock is fixed, so this is the longest we accept.
RECONNECT_BOUND = 70.0
# Backoff delays double from 0.5 s (equal jitter) to a 60 s cap: a delay of 30 s or more is
# announced after at most 0.5 + 1 + ... + 32 = 63.5 s of pauses, plus the failed handshakes.
BACKOFF_GROWTH = 80.0
# What the running agent logs (edgefleet/mqtt/session.py describe_tls_failure, edgefleet/mqtt/link.py).
WRONG_CLOCK = r"broker's certificate is not yet valid by this machine's clock: is the clock right\?"
RETRY = r"retrying in ([0-9.]+) s"
STEPPED = r"the system clock was stepped; retrying now"


@cache
def libfaketime() -> Path | None:
    """The preload library, from the Debian package's file list."""
    try:
        files = subprocess.run(["dpkg", "-L", "libfaketime"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((Path(f) for f in files.splitlines() if f.endswith("/libfaketime.so.1")), None)


needs_libfaketime = pytest.mark.skipif(libfaketime() is None, reason="libfaketime is not installed")


class Report:
    """The parsed output of one `edge-agent check`."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err
        self.findings: dict[str, tuple[bool, str]] = {}
        for line in out.splitlines():
            match = LINE.match(line)
            assert match, f"not a finding line: {line!r}\n{out}"
            status, name, message = match.groups()
            assert name not in self.findings, f"{name} reported twice:\n{out}"
            self.findings[name] = (status == "ok  ", message)

    def failed(self) -> set[str]:
        return {name for name, (ok, _) in self.findings.items() if not ok}

    def fail(self, name: str) -> str:
        ok, message = self.findings[name]
        assert not ok, f"{name} passed:\n{self.out}"
        return message

    def __str__(self) -> str:
        return f"exit {self.code}\n{self.out}{self.err}"


async def check(config: Path, *overrides: str, fake_date: str | None = None) -> Report:
    sets = [a for o in overrides for a in ("--set", o)]
    argv = [AGENT, "check", "--config", str(config), *sets]
    if fake_date is not None:
        assert FAKETIME is not None
        argv = [FAKETIME, fake_date, *argv]
    # TZ=UTC: faketime reads its date in local time.
    return Report(*await run_cli(*argv, env={"TZ": "UTC"}, timeout=30))


def cert_of(bundle: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((bundle / "device.crt").read_bytes())


async def test_healthy_device_all_ok(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-ok")
    report = await check(bundles / "dev-ok" / "agent.toml")
    assert report.code == 0, report
    assert report.failed() == set(), report
    assert {"config", "key permissions", "identity", "clock", "policy key", "network", "broker"} <= \
        set(report.findings), report
    assert f"127.0.0.1:{hub_dir.port}" in report.findings["broker"][1]
    assert "no signed policy yet" in report.findings["policy key"][1]
    assert report.err == ""


@pytest.mark.parametrize("breakage", ["missing", "not a key"])
async def test_a_missing_or_broken_policy_key_is_named_and_the_broker_still_tried(
        hub_dir: HubDir, hub: Proc, bundles: Path, breakage: str) -> None:
    await hub_dir.provision(bundles, "dev-pk")
    key = bundles / "dev-pk" / "policy.pub"
    if breakage == "missing":
        key.unlink()
    else:
        key.write_bytes((bundles / "dev-pk" / "ca.crt").read_bytes())
    report = await check(bundles / "dev-pk" / "agent.toml")
    assert report.code == 1, report
    assert report.failed() == {"policy key"}, report
    message = report.fail("policy key")
    assert str(key) in message
    assert "policy.pub" in message
    assert report.findings["broker"][0]  # the rest of the device is fine and still checked


@needs_faketime
async def test_clock_in_1970(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-1970")
    report = await check(bundles / "dev-1970" / "agent.toml", fake_date="1970-01-01 00:00:00")
    assert report.code == 1, report
    clock = report.fail("clock")
    assert "reads 1970-01-01" in clock
    assert "time sync" in clock
    assert "timedatectl set-ntp true" in clock
    # The TLS handshake fails for the same reason, and says so; nothing else is wrong.
    assert report.failed() <= {"clock", "broker"}, report
    if "broker" in report.failed():
        assert "clock" in report.fail("broker")
    for name in ("config", "key permissions", "identity", "network"):
        assert report.findings[name][0], report


async def check_after_expiry(bundle: Path, end: dt.datetime) -> tuple[Report, str]:
    """`edge-agent check` two days after `end` (faketime): its clock finding must fail, saying the
    certificate expired and how to re-provision the device (it cannot renew in band)."""
    later = end + dt.timedelta(days=2)
    report = await check(bundle / "agent.toml", fake_date=later.strftime("%Y-%m-%d %H:%M:%S"))
    assert report.code == 1, report
    clock = report.fail("clock")
    assert f"expired on {end:%Y-%m-%d}" in clock
    assert "cannot renew in band" in clock
    assert "Re-provision the device" in clock
    assert "edge-hub provision --csr" in clock
    return report, clock


@needs_faketime
async def test_clock_past_certificate_expiry(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-late")
    bundle = bundles / "dev-late"
    report, clock = await check_after_expiry(bundle, cert_of(bundle).not_valid_after_utc)
    assert "1970" not in clock
    assert "time sync" not in clock
    assert report.failed() <= {"clock", "broker"}, report
    if "broker" in report.failed():
        assert "clock" in report.fail("broker")
    for name in ("config", "key permissions", "identity", "network"):
        assert report.findings[name][0], report


@pytest.mark.parametrize(("filename", "key"), [("device.crt", "cert"), ("ca.crt", "ca")])
async def test_missing_file(hub_dir: HubDir, bundles: Path, filename: str, key: str) -> None:
    await hub_dir.provision(bundles, "dev-m")
    bundle = bundles / "dev-m"
    (bundle / filename).unlink()
    report = await check(bundle / "agent.toml")
    assert report.code == 1, report
    message = report.fail(f"file {key}")
    assert f"{bundle / filename} does not exist" in message
    assert f"copy the device bundle's {filename} there" in message
    assert f"tls.{key}" in message
    # Only the missing file is reported; the network is not tried without it.
    assert report.failed() == {f"file {key}", "broker"}, report
    assert "not tried" in report.fail("broker")
    assert report.findings["config"][0]


async def test_world_readable_key(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-p")
    bundle = bundles / "dev-p"
    key = bundle / "device.key"
    key.chmod(0o644)
    report = await check(bundle / "agent.toml")
    assert report.code == 1, report
    message = report.fail("key permissions")
    assert "readable by other users" in message
    assert "0644" in message
    assert f"chmod 600 {key}" in message
    # A loose mode is not fatal: everything else is checked, and passes.
    assert report.failed() == {"key permissions"}, report


async def test_broker_unreachable_without_hub(hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-u")
    report = await check(bundles / "dev-u" / "agent.toml")
    assert report.code == 1, report
    message = report.fail("network")
    assert f"cannot reach the broker at 127.0.0.1:{hub_dir.port}" in message
    assert "is the hub running" in message
    assert report.failed() == {"network"}, report


async def test_broker_unreachable_on_wrong_port(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-w")
    port = free_port()
    report = await check(bundles / "dev-w" / "agent.toml", f"broker.port={port}")
    assert report.code == 1, report
    message = report.fail("network")
    assert f"cannot reach the broker at 127.0.0.1:{port}" in message
    assert "is the hub running" in message
    assert "broker.port" in message
    assert report.failed() == {"network"}, report


async def test_revoked_device(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-r")
    config = bundles / "dev-r" / "agent.toml"
    assert (await check(config)).code == 0
    code, _, err = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), "dev-r")
    assert code == 0, err
    report = await check(config)
    assert report.code == 1, report
    message = report.fail("broker")
    assert f"the broker at 127.0.0.1:{hub_dir.port} refused the connection" in message
    assert "certificate is revoked" in message
    assert "provision it again" in message
    assert report.failed() == {"broker"}, report


def _unknown_top_level_key(text: str) -> str:
    return f'colour = "red"\n{text}'


def _invalid_toml(text: str) -> str:
    return text.replace('device_id = "dev-c"', 'device_id = "dev-c')


@pytest.mark.parametrize(
    ("breakage", "words"),
    [(_invalid_toml, "not valid TOML"), (_unknown_top_level_key, "unknown field `colour`")],
    ids=["invalid-toml", "unknown-key"],
)
async def test_broken_config(hub_dir: HubDir, bundles: Path, breakage: Callable[[str], str], words: str) -> None:
    await hub_dir.provision(bundles, "dev-c")
    config = bundles / "dev-c" / "agent.toml"
    before = config.read_text()
    broken = breakage(before)
    assert broken != before
    config.write_text(broken)
    report = await check(config)
    assert report.code == 2, report
    assert report.out == "", report
    assert report.err.startswith(f"edge-agent: configuration error: {config}"), report
    assert words in report.err, report


async def test_unknown_override_is_a_config_error(hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-o")
    report = await check(bundles / "dev-o" / "agent.toml", "broker.colour=1")
    assert report.code == 2, report
    assert report.out == ""
    assert "configuration error" in report.err
    assert "unknown field `colour`" in report.err


def set_clock(clock: Path, setting: str) -> None:
    """Atomically: with FAKETIME_NO_CACHE the agent reads the file at every clock call."""
    tmp = clock.with_suffix(".tmp")
    tmp.write_text(setting + "\n")
    tmp.replace(clock)


async def agent_in_1970(bundle: Path, clock: Path) -> Proc:
    """`edge-agent run` on a board whose clock reads 1970 until `clock` is rewritten."""
    set_clock(clock, "@1970-01-01 00:00:00")
    env = {
        "LD_PRELOAD": str(libfaketime()),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",
        # A time sync steps the wall clock only; CLOCK_MONOTONIC (asyncio's timers) keeps running.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "TZ": "UTC",  # the file's date is read in local time
    }
    argv = [AGENT, "run", "--config", str(bundle / "agent.toml"), "--log-level", "debug"]
    agent = await Proc(bundle.name, argv, env=env).start()
    # At start it says plainly that the clock is wrong ...
    started = await agent.wait_for(r"system clock reads 1970-01-01")
    assert "level=warning" in started
    assert "time sync" in started
    # ... and each TLS failure names the clock too.
    first = await agent.wait_for(WRONG_CLOCK)
    assert first.startswith("ts=1970-01-01"), first  # the preload works: the agent lives in 1970
    assert "level=warning" in first
    return agent


async def fix_clock_and_wait_online(hub: Proc, agent: Proc, clock: Path, device: str) -> float:
    """Step the clock to the real time; return the seconds until the hub sees the device online."""
    assert agent.proc is not None
    assert agent.proc.returncode is None, "the agent gave up on a wrong clock"
    assert not [line for line in hub.lines if f"device {device} is online" in line]
    mark = hub.mark()
    fixed = time.monotonic()
    set_clock(clock, "+0")  # offset zero: the real time, as after a time sync
    await hub.wait_for(rf"device {device} is online", timeout=RECONNECT_BOUND, after=mark)
    waited = time.monotonic() - fixed
    assert agent.proc.returncode is None
    online = await agent.wait_for(rf"{device} online \(profile sim\b")
    assert not online.startswith("ts=1970"), online
    return waited


@needs_libfaketime
async def test_agent_keeps_running_once_the_clock_is_fixed(hub_dir: HubDir, hub: Proc, bundles: Path,
                                                           workdir: Path) -> None:
    await hub_dir.provision(bundles, "dev-t")
    clock = workdir / "faketime.rc"
    agent = await agent_in_1970(bundles / "dev-t", clock)
    try:
        # It keeps trying (and running) rather than giving up on a wrong clock.
        again = await agent.wait_for(WRONG_CLOCK + ".*" + RETRY, after=agent.mark())
        delay = float(re.findall(RETRY, again)[-1])
        waited = await fix_clock_and_wait_online(hub, agent, clock, "dev-t")
        print(f"\nonline {waited:.2f} s after the clock was fixed (retry delay then {delay} s)")
        assert waited <= delay + 5.0
    finally:
        await agent.stop()


@needs_libfaketime
@pytest.mark.timeout(200)
async def test_agent_reconnects_soon_after_a_long_wrong_clock(hub_dir: HubDir, hub: Proc, bundles: Path,
                                                              workdir: Path) -> None:
    """The worst case: the clock was wrong long enough for the backoff to reach 30-60 s."""
    await hub_dir.provision(bundles, "dev-long")
    clock = workdir / "faketime.rc"
    started = time.monotonic()
    agent = await agent_in_1970(bundles / "dev-long", clock)
    try:
        long = await agent.wait_for(WRONG_CLOCK + r".*retrying in (3\d|[4-5]\d|60)\.\d s", timeout=BACKOFF_GROWTH)
        delay = float(re.findall(RETRY, long)[-1])
        wrong_for = time.monotonic() - started
        # Stepped at once: the agent takes its clock baseline before each attempt, so a step
        # that lands between the failure and the pause is still seen.
        mark = agent.mark()
        waited = await fix_clock_and_wait_online(hub, agent, clock, "dev-long")
        print(f"\nclock wrong for {wrong_for:.1f} s; online {waited:.2f} s after it was fixed "
              f"(retry delay then {delay} s)")
        await agent.wait_for(STEPPED, after=mark, timeout=1.0)
        # The pause polls the clock once a second; then one TLS handshake.
        assert waited <= 10.0
    finally:
        await agent.stop()
