"""Issue 18: zero-touch enrollment from one image folder.

Real `edge-hub run` (managed Mosquitto, the HTTPS enrollment endpoint), real `edge-agent run`
processes started from copies of one image folder, certificates made at test time. Waits are
on log lines, each bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import re
import shutil
import signal
import sqlite3
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.mqtt.session import TlsIdentity
from tests.integration.test_security import assert_connects, assert_refused, tls_context
from tests.support.harness import AGENT, HUB, HubDir, Proc, run_cli, start_agent, start_hub
from tests.support.net import free_port

pytestmark = pytest.mark.integration

ENROLL_TIMEOUT = 60.0  # key helper start-up and a TLS round trip on a loaded 2-core machine, with retries
TLS = ssl.TLSVersion.TLSv1_3
POLL = 0.2  # seconds between looks at the hub's database


def configure_enrollment(hub_dir: HubDir, **extra: float) -> int:
    """Turn the hub's enrollment endpoint on (a free port) with `extra` [enroll] settings; the port."""
    port = free_port(avoid=(hub_dir.port, hub_dir.metrics_port))
    config = hub_dir.dir / "hub.toml"
    text = config.read_text()
    settings = "".join(f"\n{key} = {value}" for key, value in {"retry_s": 1, **extra}.items())
    head, _, tail = text.partition("[enroll]")
    tail = re.sub(r"(?m)^port = \d+.*$", f"port = {port}{settings}", tail, count=1)
    config.write_text(head + "[enroll]" + tail)
    return port


@pytest.fixture
async def enroll_port(hub_dir: HubDir) -> int:
    return configure_enrollment(hub_dir)


@pytest.fixture
async def ehub(hub_dir: HubDir, enroll_port: int) -> AsyncIterator[Proc]:
    proc = await start_hub(hub_dir)
    try:
        await proc.wait_for(r"enrollment at https://")
        yield proc
    finally:
        await proc.stop()


async def create_image(hub_dir: HubDir, out: Path, *options: str) -> str:
    """`edge-hub enroll create`; the enrollment id."""
    code, stdout, stderr = await run_cli(HUB, "enroll", "create", "--dir", str(hub_dir.dir), "--out", str(out),
                                         "--profile", "sim", *options)
    assert code == 0, stderr
    match = re.search(r"enrollment (\w+) created", stdout)
    assert match, stdout
    return match[1]


def board(image: Path, root: Path, name: str) -> Path:
    """The image folder as flashed onto one board: an unchanged copy."""
    folder = root / name
    shutil.copytree(image, folder)
    return folder


async def start_board(folder: Path, device: str) -> Proc:
    return await start_agent(folder / "agent.toml", f"device_id={device}", name=device)


def hub_db(hub_dir: HubDir) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True)


def query(hub_dir: HubDir, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    db = hub_db(hub_dir)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def device_certs(hub_dir: HubDir, device: str) -> list[tuple[object, ...]]:
    """(serial, revoked_at) of the device certificates the hub recorded for `device`."""
    return query(hub_dir, "SELECT serial, revoked_at FROM certificates WHERE device = ? AND purpose = 'device'",
                 (device,))


def stored_identity(folder: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / "state" / "identity.pem").read_bytes())


def stored_key(folder: Path) -> bytes:
    key = serialization.load_pem_private_key((folder / "state" / "identity.pem").read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def events(hub_dir: HubDir, kind: str) -> list[dict[str, object]]:
    return [json.loads(body) for (body,) in query(
        hub_dir, "SELECT body FROM events WHERE device = ? AND kind = ? ORDER BY seq", (f"hub.{hub_dir.region}", kind))]


def stored_seqs(hub_dir: HubDir, device: str) -> set[int]:
    """The sequence numbers of `device`'s records (readings and events) the hub stored."""
    return {int(seq) for (seq,) in query(hub_dir, "SELECT seq FROM telemetry WHERE device = ? UNION "
                                                  "SELECT seq FROM events WHERE device = ?", (device, device))}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def enroll_counts(hub_dir: HubDir) -> dict[str, int]:
    return {str(outcome): int(count) for outcome, count in query(
        hub_dir, "SELECT outcome, count FROM enroll_counts")}


async def eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a file the hub writes (its database) until `check()`; fail after `timeout` saying `what`."""
    for _ in range(int(timeout / POLL)):
        if check():
            return
        await asyncio.sleep(POLL)  # the hub's database has no event to await from here
    pytest.fail(f"not seen within {timeout:.0f} s: {what}")


async def devices_json(hub_dir: HubDir) -> dict[str, dict[str, object]]:
    code, out, err = await run_cli(HUB, "devices", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    return {row["device"]: row for row in map(json.loads, out.splitlines())}


# --- requests sent by hand (bad input) ---------------------------------------------------------


def csr_pem(cn: str, *, ca: bool = False, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                                 cn)]))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _post(port: int, ca: Path, token: str, body: bytes, length: int | None) -> tuple[int, dict[str, object]]:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.putrequest("POST", "/enroll")
        connection.putheader("Authorization", f"Bearer {token}")
        connection.putheader("Content-Length", str(len(body) if length is None else length))
        connection.endheaders()
        connection.send(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


async def post(port: int, image: Path, body: bytes, *, token: str | None = None,
               length: int | None = None) -> tuple[int, dict[str, object]]:
    token = (image / "enroll.token").read_text().strip() if token is None else token
    return await asyncio.to_thread(_post, port, image / "ca.crt", token, body, length)


def request(device: str, csr: str) -> bytes:
    return json.dumps({"device": device, "csr": csr}).encode()


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_one_image_many_boards_each_enroll_with_their_own_key_and_stream(
    hub_dir: HubDir, ehub: Proc, workdir: Path
) -> None:
    image = workdir / "image"
    await create_image(hub_dir, image, "--tag", "site=north", "--tag", "line=3")
    assert not (image / "device.crt").exists()
    assert not (image / "device.key").exists()
    names = [f"board-{n}" for n in range(4)]
    folders = {name: board(image, workdir / "boards", name) for name in names}
    agents = await asyncio.gather(*(start_board(folders[name], name) for name in names))
    try:
        for agent in agents:
            await agent.wait_for(r"enrolled: serial", timeout=ENROLL_TIMEOUT)
            await agent.wait_for(r"online \(profile sim", timeout=ENROLL_TIMEOUT)
        keys = {name: stored_key(folder) for name, folder in folders.items()}
        assert len(set(keys.values())) == len(names), "two boards share a key"
        assert not any((folder / "state" / "enroll.key").exists() for folder in folders.values())
        fleet = await devices_json(hub_dir)
        for name, folder in folders.items():
            assert fleet[name]["profile"] == "sim"
            assert fleet[name]["tags"] == {"line": "3", "site": "north"}
            cert = stored_identity(folder)
            assert [(format(cert.serial_number, "x"), None)] == device_certs(hub_dir, name)
        # They stream: readings from each reach the hub's store.
        for name in names:
            await eventually(lambda name=name: bool(query(
                hub_dir, "SELECT COUNT(*) FROM telemetry WHERE device = ?", (name,))[0][0]),
                f"a reading from {name} at the hub")
        assert sorted(e["device"] for e in events(hub_dir, "enrolled")) == names
    finally:
        for agent in agents:
            await agent.stop()
    # Restarted, each runs on its identity: no new enrollment, no new certificate.
    again = await start_board(folders[names[0]], names[0])
    try:
        await again.wait_for(r"online \(profile sim", timeout=ENROLL_TIMEOUT)
        assert not any("enrolled: serial" in line for line in again.lines)
        assert len(device_certs(hub_dir, names[0])) == 1
    finally:
        await again.stop()


@pytest.mark.timeout(300)
async def test_limits_max_devices_expiry_revocation_and_duplicate_ids(
    hub_dir: HubDir, ehub: Proc, workdir: Path
) -> None:
    boards = workdir / "boards"
    # --max-devices 1: the second board is refused, and says why.
    one = workdir / "one"
    one_id = await create_image(hub_dir, one, "--max-devices", "1")
    first = await start_board(board(one, boards, "m-1"), "m-1")
    try:
        await first.wait_for(r"enrolled: serial", timeout=ENROLL_TIMEOUT)
    finally:
        await first.stop()
    second = await start_board(board(one, boards, "m-2"), "m-2")
    try:
        await second.wait_for(r"enrollment refused by the hub \(exhausted\)", timeout=ENROLL_TIMEOUT)
        await second.wait_for(r"sample|reading|outbox", timeout=5)  # it runs on, sampling
    finally:
        await second.stop()
    status = json.loads((boards / "m-2" / "state" / "enroll.json").read_text())
    assert status["state"] == "refused"
    assert status["reason"] == "exhausted"
    code, out, _ = await run_cli(AGENT, "status", "--config", str(boards / "m-2" / "agent.toml"),
                                 "--set", "device_id=m-2")
    assert code == 1
    assert "not enrolled yet (refused)" in out
    assert "exhausted" in out

    # --expires: refused once past it.
    short = workdir / "short"
    await create_image(hub_dir, short, "--expires", "1s")
    await asyncio.sleep(1.5)  # the expiry itself is the subject: the hub's clock must pass it
    late = await start_board(board(short, boards, "x-1"), "x-1")
    try:
        await late.wait_for(r"enrollment refused by the hub \(expired\)", timeout=ENROLL_TIMEOUT)
    finally:
        await late.stop()

    # A revoked enrollment: no new devices, the enrolled one keeps running.
    code, out, err = await run_cli(HUB, "enroll", "revoke", "--dir", str(hub_dir.dir), one_id)
    assert code == 0, err
    code, out, _ = await run_cli(HUB, "enroll", "list", "--dir", str(hub_dir.dir), "--json")
    listed = {row["id"]: row for row in map(json.loads, out.splitlines())}
    assert listed[one_id]["revoked_at"] is not None
    assert listed[one_id]["enrolled"] == 1
    third = await start_board(board(one, boards, "m-3"), "m-3")
    try:
        await third.wait_for(r"enrollment refused by the hub \(revoked\)", timeout=ENROLL_TIMEOUT)
    finally:
        await third.stop()
    back = await start_board(boards / "m-1", "m-1")
    try:
        await back.wait_for(r"online \(profile sim", timeout=ENROLL_TIMEOUT)
    finally:
        await back.stop()

    # The same id from another key (another board claiming m-1): refused until the operator readmits it.
    fresh = workdir / "fresh"
    await create_image(hub_dir, fresh)
    clone = board(fresh, boards, "m-1-again")
    impostor = await start_board(clone, "m-1")
    try:
        await impostor.wait_for(r"enrollment refused by the hub \(already_enrolled\)", timeout=ENROLL_TIMEOUT)
    finally:
        await impostor.stop()
    assert len(device_certs(hub_dir, "m-1")) == 1
    code, _, err = await run_cli(HUB, "enroll", "readmit", "--dir", str(hub_dir.dir), "m-1")
    assert code == 0, err
    replacement = await start_board(clone, "m-1")
    try:
        await replacement.wait_for(r"enrolled: serial", timeout=ENROLL_TIMEOUT)
        await replacement.wait_for(r"online \(profile sim", timeout=ENROLL_TIMEOUT)
    finally:
        await replacement.stop()
    certs = dict(device_certs(hub_dir, "m-1"))
    new_serial = format(stored_identity(clone).serial_number, "x")
    old_serial = format(stored_identity(boards / "m-1").serial_number, "x")
    assert certs[new_serial] is None
    assert certs[old_serial] is not None
    reasons = {e["reason"] for e in events(hub_dir, "enroll_refused")}
    assert {"exhausted", "expired", "revoked", "already_enrolled"} <= reasons
    code, out, _ = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    shown = json.loads(out)["enroll_refused"]
    assert {"exhausted", "expired", "revoked", "already_enrolled"} <= {r["reason"] for r in shown}
    assert {r["device"] for r in shown} >= {"m-2", "x-1", "m-3", "m-1"}


@pytest.mark.timeout(240)
async def test_approval_holds_then_approve_or_deny_and_early_readings_arrive(
    hub_dir: HubDir, ehub: Proc, workdir: Path
) -> None:
    image = workdir / "image"
    await create_image(hub_dir, image, "--approve", "--tag", "site=south")
    boards = workdir / "boards"
    yes, no = board(image, boards, "a-yes"), board(image, boards, "a-no")
    agent_yes, agent_no = await start_board(yes, "a-yes"), await start_board(no, "a-no")
    try:
        await agent_yes.wait_for(r"enrollment held by the hub: waiting for an operator", timeout=ENROLL_TIMEOUT)
        await agent_no.wait_for(r"enrollment held by the hub: waiting for an operator", timeout=ENROLL_TIMEOUT)
        code, out, err = await run_cli(HUB, "approvals", "list", "--dir", str(hub_dir.dir), "--json")
        assert code == 0, err
        pending = {row["device"]: row["id"] for row in map(json.loads, out.splitlines())}
        assert set(pending) == {"a-yes", "a-no"}
        code, out, _ = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
        assert "enrollment " in out
        assert "approvals pending: 2" in out
        assert not await devices_json(hub_dir)  # nothing registered while held
        code, _, err = await run_cli(HUB, "approvals", "deny", "--dir", str(hub_dir.dir), str(pending["a-no"]),
                                     "--reason", "not ours")
        assert code == 0, err
        code, _, err = await run_cli(HUB, "approvals", "approve", "--dir", str(hub_dir.dir), str(pending["a-yes"]))
        assert code == 0, err
        await agent_yes.wait_for(r"enrolled: serial", timeout=ENROLL_TIMEOUT)
        await agent_yes.wait_for(r"online \(profile sim", timeout=ENROLL_TIMEOUT)
        await agent_no.wait_for(r"enrollment refused by the hub \(denied\).*not ours", timeout=ENROLL_TIMEOUT)
        # Readings sampled while held are sent once enrolled: the first seq reaches the hub.
        await eventually(lambda: bool(query(hub_dir, "SELECT COUNT(*) FROM telemetry WHERE device = 'a-yes' "
                                            "AND seq = 1")[0][0]), "the readings taken before enrollment at the hub")
    finally:
        await agent_yes.stop()
        await agent_no.stop()
    assert set(await devices_json(hub_dir)) == {"a-yes"}
    decided = {e["device"] for e in events(hub_dir, "approval_approved")} | {
        e["device"] for e in events(hub_dir, "approval_denied")}
    assert decided == {"a-yes", "a-no"}
    assert {e["device"] for e in events(hub_dir, "enroll_pending")} == {"a-yes", "a-no"}


async def test_the_bootstrap_credential_cannot_reach_the_broker(
    hub_dir: HubDir, ehub: Proc, workdir: Path
) -> None:
    image = workdir / "image"
    await create_image(hub_dir, image)
    token = (image / "enroll.token").read_text().strip()
    # Everything the image holds: the CA and the credential. No client certificate, so no TLS session.
    await assert_refused(tls_context(None, image / "ca.crt", TLS), hub_dir.port, "board-x", "certificate required")
    # The credential as MQTT username and password changes nothing: publish and subscribe both refused.
    for argv in (["mosquitto_pub", "-t", "up/board-x/batch", "-m", "{}", "-q", "1"],
                 ["mosquitto_sub", "-t", "down/board-x/#", "-C", "1", "-W", "3"]):
        code, _, _err = await run_cli(*argv, "-h", "127.0.0.1", "-p", str(hub_dir.port), "--cafile",
                                     str(image / "ca.crt"), "-u", token.split(".")[1], "-P", token, "-i", "board-x",
                                     timeout=30)
        assert code != 0, f"{argv[0]} with the bootstrap credential was let in"
    # The broker itself is fine: a provisioned device connects.
    await hub_dir.provision(workdir / "bundles", "real-1")
    real = workdir / "bundles" / "real-1"
    await assert_connects(tls_context(TlsIdentity(real / "ca.crt", real / "device.crt", real / "device.key"),
                                      real / "ca.crt", TLS), hub_dir.port, "real-1")


@pytest.mark.timeout(240)
async def test_bad_requests_are_refused_with_the_reason_audited_and_counted(
    hub_dir: HubDir, ehub: Proc, workdir: Path, enroll_port: int
) -> None:
    image = workdir / "image"
    await create_image(hub_dir, image)
    expired = workdir / "expired"
    await create_image(hub_dir, expired, "--expires", "1s")
    token = (image / "enroll.token").read_text().strip()
    forged = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    await asyncio.sleep(1.5)  # past the second enrollment's expiry
    cases: list[tuple[str, int, str, dict[str, object]]] = []

    async def expect(what: str, status: int, reason: str, body: bytes, **kwargs: object) -> None:
        got, reply = await post(enroll_port, image, body, **kwargs)
        assert (got, reply.get("reason")) == (status, reason), f"{what}: {got} {reply}"
        assert reply.get("outcome") == "refused", reply
        assert reply.get("detail"), reply
        cases.append((what, got, reason, reply))

    await expect("forged secret", 403, "forged", request("bad-1", csr_pem("bad-1")), token=forged)
    await expect("no credential", 403, "forged", request("bad-1", csr_pem("bad-1")), token="")
    await expect("expired credential", 403, "expired", request("bad-2", csr_pem("bad-2")),
                 token=(expired / "enroll.token").read_text().strip())
    await expect("CSR for another id", 403, "wrong_subject", request("bad-3", csr_pem("someone-else")))
    await expect("CA:TRUE CSR", 403, "ca_request", request("bad-4", csr_pem("bad-4", ca=True)))
    await expect("not a CSR", 403, "bad_request", request("bad-5", "-----BEGIN CERTIFICATE REQUEST-----\nxx"))
    await expect("not JSON", 400, "bad_request", b"{device: ")
    await expect("oversized", 413, "oversized", b"x" * 100, length=1_000_000)
    for bad in ("a+b", "a#b", "a/b", "+", "#", "x" * 65, ""):
        await expect(f"id {bad!r}", 403, "bad_device_id", request(bad, csr_pem(bad[:64] or "empty")))
    # Nothing of this registered anything or issued a certificate.
    assert not query(hub_dir, "SELECT device FROM certificates WHERE purpose = 'device'")
    assert not await devices_json(hub_dir)
    audited = {e["reason"] for e in events(hub_dir, "enroll_refused")}
    assert {"forged", "expired", "wrong_subject", "ca_request", "bad_request", "oversized", "bad_device_id"} <= audited
    # Counted for the metrics endpoint (flushed every few seconds), and the hub goes on serving.
    good = await post(enroll_port, image, request("good-1", csr_pem("good-1")))
    assert (good[0], good[1]["outcome"]) == (200, "issued"), good
    await eventually(lambda: bool(enroll_counts(hub_dir).get("issued")), "the counts flushed")
    counts = enroll_counts(hub_dir)
    assert (counts["refused_bad_device_id"], counts["refused_forged"], counts["issued"]) == (7, 2, 1), counts
    metrics = await asyncio.to_thread(scrape, hub_dir.metrics_port)
    assert 'edgefleet_enrollment_requests_total{outcome="refused_forged",region="test"} 2.0' in metrics, metrics
    assert ehub.proc is not None
    assert ehub.proc.returncode is None


@pytest.mark.timeout(240)
async def test_a_flood_with_a_leaked_credential_is_bounded_and_the_hub_serves_on(
    hub_dir: HubDir, workdir: Path
) -> None:
    # One token per 10 s after a burst of 5: however slowly this machine gets the 60 through, few pass.
    port = configure_enrollment(hub_dir, credential_rate=0.1, credential_burst=5, rate=1000, burst=1000)
    hub = await start_hub(hub_dir)
    try:
        leaked, other = workdir / "leaked", workdir / "other"
        await create_image(hub_dir, leaked)
        await create_image(hub_dir, other)
        flood = [post(port, leaked, request(f"flood-{n}", csr_pem(f"flood-{n}"))) for n in range(60)]
        results = await asyncio.gather(*flood)
        statuses = [status for status, _ in results]
        issued = statuses.count(200)
        assert 5 <= issued <= 15, statuses  # the burst, and one per 10 s for as long as the flood took
        assert statuses.count(429) == 60 - issued, statuses
        assert all(reply["retry_after"] for status, reply in results if status == 429)
        # Another credential is not starved: its own bucket.
        status, reply = await post(port, other, request("other-1", csr_pem("other-1")))
        assert (status, reply["outcome"]) == (200, "issued"), reply
        await hub.wait_for(r"enrollment: \d+ request\(s\) turned away", timeout=10)
        assert sum("turned away" in line for line in hub.lines) == 1  # logged once in the window
        await eventually(lambda: enroll_counts(hub_dir).get("rate_limited", 0) >= 60 - issued, "the counts flushed")
        counts = enroll_counts(hub_dir)
        assert counts["rate_limited"] == statuses.count(429), counts
        assert len(query(hub_dir, "SELECT device FROM enrolled")) == issued + 1
    finally:
        await hub.stop()


@pytest.mark.timeout(300)
async def test_kill_9_of_agent_or_hub_mid_enrollment_leaves_one_revocable_certificate(
    hub_dir: HubDir, enroll_port: int, workdir: Path
) -> None:
    hub = await start_hub(hub_dir)
    image = workdir / "image"
    await create_image(hub_dir, image)
    boards = workdir / "boards"
    rng = random.Random()
    try:
        # Agents killed at random moments of their first start, then started again.
        for n in range(4):
            name = f"k-{n}"
            folder = board(image, boards, name)
            agent = await start_board(folder, name)
            await asyncio.sleep(rng.uniform(0, 2.5))  # the moment is the subject: key helper, request, or store
            agent.signal(signal.SIGKILL)
            await agent.stop()
            again = await start_board(folder, name)
            try:
                await again.wait_for(r"online \(profile sim", timeout=ENROLL_TIMEOUT)
                await eventually(lambda name=name: bool(stored_seqs(hub_dir, name)), f"{name}'s records at the hub")
            finally:
                await again.stop()
        # The hub killed while a batch of boards enrolls, then started again.
        late = [board(image, boards, f"h-{n}") for n in range(4)]
        agents = [await start_board(folder, folder.name) for folder in late]
        await hub.wait_for(r"h-\d enrolled with enrollment", timeout=ENROLL_TIMEOUT)
        hub.signal(signal.SIGKILL)
        await hub.stop()
        hub = await start_hub(hub_dir)
        try:
            for agent in agents:
                await agent.wait_for(r"online \(profile sim", timeout=2 * ENROLL_TIMEOUT)
            for folder in late:
                await eventually(lambda name=folder.name: bool(stored_seqs(hub_dir, name)),
                                 f"{folder.name}'s records at the hub")
        finally:
            for agent in agents:
                await agent.stop()
        for folder in [*(boards / f"k-{n}" for n in range(4)), *late]:
            cert = stored_identity(folder)
            assert device_certs(hub_dir, folder.name) == [(format(cert.serial_number, "x"), None)], folder.name
            # Nothing lost: what the hub stored of the device is one unbroken run from its first record.
            seqs = stored_seqs(hub_dir, folder.name)
            assert seqs == set(range(1, max(seqs) + 1)), f"{folder.name}: gaps in {sorted(seqs)[:20]}..."
        # Revocable: the broker refuses the enrolled identity once revoked.
        victim = boards / "k-0"
        code, _, err = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), "k-0")
        assert code == 0, err
        pem = victim / "state" / "identity.pem"
        await assert_refused(tls_context(TlsIdentity(victim / "ca.crt", pem, pem), victim / "ca.crt", TLS),
                             hub_dir.port, "k-0", "revoked")
    finally:
        await hub.stop()


@pytest.mark.timeout(240)
async def test_a_board_started_before_the_hub_says_why_and_enrolls_once_it_is_up(
    hub_dir: HubDir, enroll_port: int, workdir: Path
) -> None:
    image = workdir / "image"
    await create_image(hub_dir, image)
    folder = board(image, workdir / "boards", "early-1")
    agent = await start_board(folder, "early-1")
    try:
        await agent.wait_for(r"not enrolled yet: cannot enroll at https://127\.0\.0\.1:\d+/enroll", timeout=30)
        code, out, _ = await run_cli(AGENT, "check", "--config", str(folder / "agent.toml"), "--set",
                                     "device_id=early-1")
        assert code == 1
        assert re.search(r"FAIL\s+enrollment: not enrolled yet \(unreachable\)", out), out
        hub = await start_hub(hub_dir)
        try:
            await agent.wait_for(r"enrolled: serial", timeout=2 * ENROLL_TIMEOUT)  # its next retry, backed off
            await agent.wait_for(r"online \(profile sim", timeout=ENROLL_TIMEOUT)
            await eventually(lambda: 1 in stored_seqs(hub_dir, "early-1"), "the first reading at the hub")
        finally:
            await hub.stop()
    finally:
        await agent.stop()
    assert sum("not enrolled yet" in line and "level=warning" in line for line in agent.lines) == 1  # then DEBUG
    code, out, _ = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    assert json.loads(out)["enroll_refused"] == []
