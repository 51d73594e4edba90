"""Issue 15 item 4: an interrupted `edge-hub provision` never leaves a certificate on disk that
the hub has not recorded, so `edge-hub revoke` can always lock it out.

Real `edge-hub provision` processes are interrupted with SIGINT at random moments; then every
device is revoked against a running hub with its managed Mosquitto, and every certificate
found on disk must be in the CRL and refused by the broker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import signal
import sqlite3
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from edgefleet.runtime.files import write_atomic
from hub.pki.authority import Authority, cert_pem, key_pem
from tests.integration.test_security import assert_connects, assert_refused, tls_context
from tests.support.harness import HUB, HubDir, Proc, device_identity, run_cli, start_agent

pytestmark = pytest.mark.integration

# The SIGINT goes out after one of the first INTERRUPT_WITHIN devices was logged: with DEVICES
# many, the run still has about a second of work left then, however late the signal comes on
# a loaded machine.
DEVICES = 120
INTERRUPT_WITHIN = 20
ROUNDS = 3  # interrupted runs before the one that finishes
EXIT_SIGINT = 128 + signal.SIGINT
TLS = ssl.TLSVersion.TLSv1_3
EXIT_TIMEOUT = 20.0  # an interrupted run finishes the device in hand and exits


def recorded(hub_dir: HubDir) -> dict[int, tuple[str, str, float | None]]:
    """serial -> (device, purpose, revoked_at), read from the hub's database."""
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT serial, device, purpose, revoked_at FROM certificates").fetchall()
    finally:
        db.close()
    return {int(serial, 16): (device, purpose, revoked) for serial, device, purpose, revoked in rows}


def certificates_on_disk(bundles: Path) -> dict[str, x509.Certificate]:
    return {folder.name: x509.load_pem_x509_certificate((folder / "device.crt").read_bytes())
            for folder in sorted(bundles.iterdir()) if (folder / "device.crt").exists()}


def crl_serials(hub_dir: HubDir) -> set[int]:
    crl = x509.load_pem_x509_crl((hub_dir.pki / "crl.pem").read_bytes())
    return {entry.serial_number for entry in crl}


def context(folder: Path) -> ssl.SSLContext:
    """A device's TLS context from a bundle folder."""
    return tls_context(device_identity(folder), folder / "ca.crt", TLS)


def assert_all_recorded(hub_dir: HubDir, bundles: Path) -> None:
    known = recorded(hub_dir)
    for device, cert in certificates_on_disk(bundles).items():
        assert cert.serial_number in known, f"{device}'s certificate {cert.serial_number:x} is not in hub.db"
        assert known[cert.serial_number][:2] == (device, "device")


@pytest.mark.timeout(600)  # a revoke per device: a minute or two on a loaded machine
async def test_sigint_at_random_moments_leaves_nothing_revoke_cannot_lock_out(
    hub_dir: HubDir, hub: Proc, bundles: Path
) -> None:
    devices = [f"pi-{n:03d}" for n in range(DEVICES)]
    argv = [HUB, "-v", "provision", "--dir", str(hub_dir.dir), "--out", str(bundles), "--profile", "sim"]
    rng = random.Random()
    for round_ in range(ROUNDS):
        # Each round issues anew (--reissue), so every round is interrupted in the middle of real work.
        proc = await Proc(f"provision-{round_}", [*argv, "--reissue", *devices]).start()
        after = rng.randrange(1, INTERRUPT_WITHIN)
        await proc.wait_for(rf"bundle {devices[after]}: issued")
        proc.signal(signal.SIGINT)
        assert proc.proc is not None
        async with asyncio.timeout(EXIT_TIMEOUT):
            code = await proc.proc.wait()
        await proc.stop()
        print(f"round {round_}: SIGINT after {devices[after]}; exit {code}; {proc.lines[-1]}")
        assert code == EXIT_SIGINT, "\n".join(proc.lines[-5:])
        said = next(line for line in proc.lines if "interrupted by SIGINT" in line)
        finished = int(said.split(": ")[2].split(" of ")[0])
        assert f"of {DEVICES} device(s) finished" in said
        assert "run the same command again" in said
        assert after < finished < DEVICES, said
        assert_all_recorded(hub_dir, bundles)

    code, out, err = await run_cli(*argv, *devices)
    assert code == 0, err
    assert f"{DEVICES} device bundle(s)" in out
    on_disk = certificates_on_disk(bundles)
    assert sorted(on_disk) == devices
    assert_all_recorded(hub_dir, bundles)
    await assert_connects(context(bundles / devices[0]), hub_dir.port, devices[0])

    for device in devices:
        code, out, err = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), device)
        assert code == 0, err
        assert "0 certificate(s)" not in out, out
    in_crl = crl_serials(hub_dir)
    for device, cert in on_disk.items():
        assert cert.serial_number in in_crl, f"{device}'s certificate is not in the CRL"
        await assert_refused(context(bundles / device), hub_dir.port, device, "revoked")
    # And the real agent of the device that was in hand at the last interruption.
    agent = await start_agent(bundles / devices[after] / "agent.toml")
    try:
        await agent.wait_for(r"revoked")
        assert not [line for line in agent.lines if f"{devices[after]} online" in line]
    finally:
        await agent.stop()


async def test_a_bundle_the_hub_never_recorded_is_replaced_and_still_locked_out(
    hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path
) -> None:
    """What an edge-hub that wrote the files before recording them left behind when it was
    interrupted: a valid certificate from the fleet CA that hub.db does not know."""
    await hub_dir.provision(bundles, "pi-old")
    ca = Authority.load(hub_dir.pki / "ca.key", hub_dir.pki / "ca.crt")
    key, cert = ca.issue_client("pi-old", dt.timedelta(days=90))
    assert key is not None
    folder = bundles / "pi-old"
    write_atomic(folder / "device.key", key_pem(key), 0o600)
    write_atomic(folder / "device.crt", cert_pem(cert), 0o644)
    stray = workdir / "stray-copy"  # the copy already on the device, which the hub must still lock out
    stray.mkdir()
    for name in ("device.key", "device.crt", "ca.crt"):
        (stray / name).write_bytes((folder / name).read_bytes())
    assert cert.serial_number not in recorded(hub_dir)

    code, out, err = await run_cli(HUB, "provision", "--dir", str(hub_dir.dir), "--out", str(bundles),
                                   "--profile", "sim", "pi-old")
    assert code == 0, err
    assert "1 issued" in out, out  # not "kept": the hub cannot vouch for it
    assert "never recorded" in err
    assert certificates_on_disk(bundles)["pi-old"].serial_number != cert.serial_number
    assert_all_recorded(hub_dir, bundles)

    code, out, err = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), "pi-old")
    assert code == 0, err
    assert cert.serial_number in crl_serials(hub_dir)
    await assert_refused(context(stray), hub_dir.port, "pi-old", "revoked")
    await assert_refused(context(folder), hub_dir.port, "pi-old", "revoked")

