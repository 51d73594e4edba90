"""Enrollment pieces that need no process: the credential format, the token buckets, the request
head parser, the device id sources, the agent's config for an image folder, and the hub's
decisions against a real SQLite store (no HTTP)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.config import load_settings
from edge_agent.identity import enroll as agent_enroll
from edgefleet.errors import ConfigError
from edgefleet.wire.enrollment import EnrollRequest, parse_token
from hub.config import HubConfig, HubPaths
from hub.db.store import HubStore
from hub.pki.authority import Authority, cert_pem, key_pem
from hub.pki.enroll import EnrollmentDesk, ImageSpec, revoke_enrollment
from hub.pki.enroll_server import TokenBucket, _parse_head


def test_token_format() -> None:
    secret = secrets.token_urlsafe(32)
    assert parse_token(f"efe1.0123456789ab.{secret}\n") == ("0123456789ab", secret)
    for bad in ("", "efe1.0123456789ab", f"efe2.0123456789ab.{secret}", f"efe1.0123456789AB.{secret}",
                f"efe1.0123456789ab.{secret}x", f"efe1.0123456789ab.{secret[:-1]}/"):
        assert parse_token(bad) is None, bad


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, at=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)
    assert bucket.take(100.5) == 0.0  # one token back after 1/rate
    assert bucket.take(100.5) > 0
    assert [bucket.take(200.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled, never above the burst


def test_request_head_parser() -> None:
    method, path, headers = _parse_head(b"POST /enroll?x=1 HTTP/1.1\r\nContent-Length: 12\r\nAuthorization: Bearer t"
                                        b"\r\n\r\n")
    assert (method, path, headers["content-length"], headers["authorization"]) == ("POST", "/enroll", "12", "Bearer t")
    for bad in (b"GET /\r\n\r\n", b"POST /enroll HTTP/1.1\r\nno colon here\r\n\r\n", b"\r\n\r\n"):
        with pytest.raises(ValueError, match="not"):
            _parse_head(bad)


def test_device_id_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    monkeypatch.setattr(agent_enroll, "MACHINE_ID", machine_id)
    assert agent_enroll.read_device_id("machine-id", None, "pi-") == "pi-0123456789abcdef0123456789abcdef"
    serial = tmp_path / "serial-number"
    serial.write_bytes(b"10000000abcd1234\x00")
    monkeypatch.setattr(agent_enroll, "DT_SERIAL", serial)
    assert agent_enroll.read_device_id("serial", None) == "10000000abcd1234"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nSerial\t\t: 00000000feedbeef\nModel\t: Raspberry Pi\n")
    monkeypatch.setattr(agent_enroll, "DT_SERIAL", tmp_path / "absent")
    monkeypatch.setattr(agent_enroll, "CPUINFO", cpuinfo)
    assert agent_enroll.read_device_id("serial", None) == "00000000feedbeef"
    named = tmp_path / "id"
    named.write_text("cabinet-7\n")
    assert agent_enroll.read_device_id("file", named) == "cabinet-7"
    with pytest.raises(ConfigError, match="cannot read the device id"):
        agent_enroll.read_device_id("file", tmp_path / "nope")
    named.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        agent_enroll.read_device_id("file", named)


IMAGE_TOML = """\
profile = "sim"
[enroll]
url = "{url}"
device_id_source = "file"
device_id_file = "id"
[broker]
host = "127.0.0.1"
"""


def test_an_image_folder_config_takes_its_id_from_the_source(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("board-9\n")
    config = tmp_path / "agent.toml"
    config.write_text(IMAGE_TOML.format(url="https://hub:8884/enroll"))
    settings = load_settings(config)
    assert settings.config.device_id == "board-9"
    assert settings.enroll_token == tmp_path / "enroll.token"
    assert load_settings(config, ["device_id=override-1"]).config.device_id == "override-1"
    (tmp_path / "id").write_text("a/b\n")
    with pytest.raises(ConfigError, match="not allowed"):
        load_settings(config)
    config.write_text(IMAGE_TOML.format(url="http://hub:8884/enroll"))
    with pytest.raises(ConfigError, match="https"):
        load_settings(config)
    config.write_text('profile = "sim"\n[broker]\nhost = "h"\n')
    with pytest.raises(ConfigError, match="device id is missing"):
        load_settings(config)


# --- the hub's decisions, on a real store ------------------------------------------------------


def _csr(cn: str, key: ec.EllipticCurvePrivateKey) -> str:
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256()))
    return request.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
async def desk(tmp_path: Path) -> EnrollmentDesk:
    paths = HubPaths(tmp_path)
    paths.pki.mkdir()
    ca = Authority.create("t")
    paths.ca_key.write_bytes(key_pem(ca.key))
    paths.ca_cert.write_bytes(cert_pem(ca.cert))
    store = await HubStore.open(paths.db)
    return EnrollmentDesk(paths, HubConfig(region="t"), store)


async def _enrollment(desk: EnrollmentDesk, spec: ImageSpec) -> str:
    """An enrollment as `enroll create` records it (without the folder); its credential."""
    from hub.db import enrollments
    from hub.db.enrollments import EnrollmentRow
    from hub.pki.enroll import _digest

    enrollment_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    row = EnrollmentRow(enrollment_id, spec.profile, spec.tags, spec.max_devices, spec.expires_at, spec.approve,
                        0.0, "test", None, 0, 0)
    await desk.store.atomically(lambda db: enrollments.insert_enrollment(db, row, _digest(secret)))
    return f"efe1.{enrollment_id}.{secret}"


async def test_repeat_with_the_same_key_gets_the_same_certificate_and_another_key_is_refused(
    desk: EnrollmentDesk,
) -> None:
    try:
        token = await _enrollment(desk, ImageSpec("sim", {"site": "a"}, 2, None, False))
        key = ec.generate_private_key(ec.SECP256R1())
        first = await desk.answer(token, EnrollRequest("dev-1", _csr("dev-1", key)), "test")
        again = await desk.answer(token, EnrollRequest("dev-1", _csr("dev-1", key)), "test")
        assert first.outcome == "issued"
        assert again.cert == first.cert  # a lost reply costs nothing, and enrolls once
        other = await desk.answer(token, EnrollRequest("dev-1", _csr("dev-1", ec.generate_private_key(
            ec.SECP256R1()))), "test")
        assert (other.outcome, other.reason) == ("refused", "already_enrolled")
        assert (await desk.store.query("SELECT COUNT(*) FROM certificates WHERE device = 'dev-1'"))[0][0] == 1
        rows = await desk.store.query("SELECT profile, tags FROM devices WHERE device = 'dev-1'")
        assert tuple(rows[0]) == ("sim", '{"site": "a"}')
        await revoke_enrollment(desk.config, desk.store, token.split(".")[1], "test")
        late = await desk.answer(token, EnrollRequest("dev-2", _csr("dev-2", key)), "test")
        assert (late.outcome, late.reason) == ("refused", "revoked")
    finally:
        await desk.store.close()


async def test_refusals_are_audited_once_per_window_and_all_counted(desk: EnrollmentDesk) -> None:
    try:
        for _ in range(5):
            reply = await desk.answer("efe1.nothing", EnrollRequest("dev-1", "x"), "test")
            assert (reply.outcome, reply.reason) == ("refused", "forged")
        events = await desk.store.query("SELECT COUNT(*) FROM events WHERE kind = 'enroll_refused'")
        assert events[0][0] == 1
        assert desk.counts["refused_forged"] == 5
        await desk.flush_counts()
        assert not desk.counts
        assert tuple((await desk.store.query("SELECT outcome, count FROM enroll_counts"))[0]) == ("refused_forged", 5)
    finally:
        await desk.store.close()


# --- the agent's side, with the HTTPS exchange faked (the transport) ------------------------------


@pytest.fixture
def image_device(tmp_path: Path) -> tuple[agent_enroll.Enrollment, Authority]:
    from edge_agent.identity.tls import IdentityFiles
    from edgefleet.mqtt.session import TlsIdentity

    ca = Authority.create("t")
    (tmp_path / "ca.crt").write_bytes(cert_pem(ca.cert))
    (tmp_path / "enroll.token").write_text(f"efe1.0123456789ab.{secrets.token_urlsafe(32)}\n")
    state = tmp_path / "state"
    state.mkdir()
    files = IdentityFiles(TlsIdentity(tmp_path / "ca.crt", tmp_path / "device.crt", tmp_path / "device.key"), state)
    enrollment = agent_enroll.Enrollment("board-1", "https://127.0.0.1:1/enroll", tmp_path / "enroll.token", files,
                                         state)
    enrollment.make_request = agent_enroll.make_request_in_process
    return enrollment, ca


async def test_held_then_issued_stores_the_identity_and_drops_the_key(
    image_device: tuple[agent_enroll.Enrollment, Authority], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datetime as dt

    import msgspec

    from edgefleet.wire.enrollment import EnrollReply

    enrollment, ca = image_device
    answers = [(202, EnrollReply(outcome="pending", reason="approval", retry_after=3.0, detail="waiting: approve 1"))]

    def post(url: str, token: str, body: bytes, ca_path: Path) -> tuple[int, bytes]:
        sent = msgspec.json.decode(body, type=EnrollRequest)
        assert token.startswith("efe1.")
        if answers:
            status, reply = answers.pop(0)
        else:
            csr = x509.load_pem_x509_csr(sent.csr.encode())
            cert = ca.sign_request(csr, sent.device, dt.timedelta(days=1))
            status, reply = 200, EnrollReply(outcome="issued", cert=cert_pem(cert).decode())
        return status, msgspec.json.encode(reply)

    monkeypatch.setattr(agent_enroll, "_post", post)
    assert enrollment.needed()
    assert await enrollment.attempt() == 3.0
    status = agent_enroll.read_status(enrollment.state_dir)
    assert status is not None
    assert (status.state, status.reason) == ("pending", "approval")
    key_before = enrollment.key.read_bytes()
    assert await enrollment.attempt() is None
    assert not enrollment.key.exists()
    current = enrollment.files.current()
    assert current is not None
    assert current.cert.common_name == "board-1"
    assert key_before.strip() in (enrollment.state_dir / "identity.pem").read_bytes()  # the key made first
    assert not enrollment.needed()


async def test_unreachable_and_refused_wait_and_say_why_once(
    image_device: tuple[agent_enroll.Enrollment, Authority], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import msgspec

    from edgefleet.wire.enrollment import EnrollReply

    enrollment, _ = image_device

    def down(*_: object) -> tuple[int, bytes]:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(agent_enroll, "_post", down)
    waits = [await enrollment.attempt() for _ in range(3)]
    assert waits[0] is not None
    assert agent_enroll.FIRST_RETRY / 2 <= waits[0] <= agent_enroll.FIRST_RETRY
    assert waits[2] is not None
    assert waits[2] > waits[0]  # backing off
    warned = [r for r in caplog.records if r.name == "edge_agent.enroll" and r.levelname == "WARNING"]
    assert len(warned) == 1
    assert "cannot enroll at https://127.0.0.1:1/enroll" in warned[0].getMessage()

    refusal = EnrollReply(outcome="refused", reason="exhausted", detail="used up")
    monkeypatch.setattr(agent_enroll, "_post", lambda *_: (403, msgspec.json.encode(refusal)))
    wait = await enrollment.attempt()
    assert wait is not None
    assert agent_enroll.REFUSED_RETRY / 2 <= wait <= agent_enroll.REFUSED_RETRY
    status = agent_enroll.read_status(enrollment.state_dir)
    assert status is not None
    assert (status.state, status.reason) == ("refused", "exhausted")
    assert "used up" in status.detail
    assert enrollment.needed()


def test_a_request_for_a_ca_is_refused_by_enrollment_and_renewal_alike() -> None:
    import datetime as dt

    from hub.pki.authority import CsrRefused

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, hashes.SHA256()))
    with pytest.raises(CsrRefused, match="CA:TRUE") as refused:
        Authority.create("t").sign_request(csr, "dev-1", dt.timedelta(days=1))
    assert refused.value.reason == "ca_request"


def test_status_of_an_image_device_that_never_tried(tmp_path: Path) -> None:
    from edge_agent.ops.status import collect

    (tmp_path / "id").write_text("board-9\n")
    config = tmp_path / "agent.toml"
    config.write_text(IMAGE_TOML.format(url="https://hub:8884/enroll"))
    status = collect(load_settings(config), None)
    assert not status.healthy
    assert status.enrollment is None
    assert status.attention[0] == ("not enrolled yet, and no attempt made: start the agent; it enrolls at "
                                   "https://hub:8884/enroll")
