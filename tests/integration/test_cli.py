"""The operator and device CLIs as real processes: `edge-hub init/provision/revoke/devices`,
`--help`, and `edge-agent` configuration errors. No broker is started."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.config import CONFIG_KEYS, load_settings
from edgefleet.policy.profiles import PROFILE_KEYS, available_profiles
from tests.support.harness import AGENT, HUB, HubDir, free_port, run_cli

NAME_RULE = "1 to 64 of the characters A-Z a-z 0-9 _ -"
PRIVATE_KEYS = ("pki/ca.key", "pki/hub.key", "pki/policy.key", "broker/server.key")
INIT_FILES = (
    "pki/ca.crt",
    "pki/ca.key",
    "pki/hub.crt",
    "pki/hub.key",
    "pki/policy.key",
    "pki/policy.pub",
    "pki/crl.pem",
    "broker/mosquitto.conf",
    "broker/acl",
    "broker/server.crt",
    "broker/server.key",
    "hub.toml",
    "hub.db",
)
BUNDLE_FILES = ("agent.toml", "ca.crt", "device.crt", "device.key", "policy.pub")


# --- helpers ---------------------------------------------------------------------------


async def hub_cmd(*argv: str, timeout: float = 60.0) -> tuple[int, str, str]:
    return await run_cli(HUB, *argv, timeout=timeout)


async def provision(hub_dir: HubDir, out: Path, *argv: str) -> tuple[int, str, str]:
    return await hub_cmd("provision", "--dir", str(hub_dir.dir), "--out", str(out), *argv)


async def device_rows(directory: Path) -> dict[str, dict[str, object]]:
    code, out, err = await hub_cmd("devices", "--dir", str(directory), "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {str(row["device"]): row for row in rows}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def eku(certificate: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def private_key(path: Path) -> object:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def make_csr(
    device: str, encoding: serialization.Encoding = serialization.Encoding.PEM
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(encoding)


async def init(directory: Path, region: str, port: int, *extra: str) -> tuple[int, str, str]:
    return await hub_cmd("init", "--dir", str(directory), "--region", region, "--port", str(port), *extra)


# --- edge-hub init ----------------------------------------------------------------------


async def test_init_creates_the_hub_layout_and_pki(workdir: Path) -> None:
    root, port, host, region = workdir / "hub", free_port(), "edge-hub.example.test", "eu-west_1"
    code, out, err = await init(root, region, port, "--host", host)
    assert code == 0, err
    assert str(root.resolve()) in out

    for rel in INIT_FILES:
        assert (root / rel).is_file(), f"{rel} is missing"
    for rel in PRIVATE_KEYS:
        assert mode(root / rel) == 0o600, f"{rel} has mode {mode(root / rel):04o}"

    # The fleet CA: ECDSA P-256, a (self-signed) CA.
    ca_cert, ca_key = cert(root / "pki/ca.crt"), private_key(root / "pki/ca.key")
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(ca_key.curve, ec.SECP256R1)
    ca_pub = ca_cert.public_key()
    assert isinstance(ca_pub, ec.EllipticCurvePublicKey)
    assert isinstance(ca_pub.curve, ec.SECP256R1)
    assert spki(ca_key.public_key()) == spki(ca_pub)
    constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca is True
    assert constraints.critical
    assert ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca_cert.verify_directly_issued_by(ca_cert)

    # The policy-signing key: Ed25519, with its public half, and not the CA's key.
    policy_key = private_key(root / "pki/policy.key")
    assert isinstance(policy_key, ed25519.Ed25519PrivateKey)
    policy_pub = serialization.load_pem_public_key((root / "pki/policy.pub").read_bytes())
    assert isinstance(policy_pub, ed25519.Ed25519PublicKey)
    assert spki(policy_pub) == spki(policy_key.public_key())
    assert spki(policy_pub) != spki(ca_pub)
    assert (root / "pki/policy.key").read_bytes() != (root / "pki/ca.key").read_bytes()

    # The broker's server certificate: SANs for --host and 127.0.0.1, issued by the CA.
    server = cert(root / "broker/server.crt")
    server.verify_directly_issued_by(ca_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in san.get_values_for_type(x509.DNSName)
    assert any(str(ip) == "127.0.0.1" for ip in san.get_values_for_type(x509.IPAddress))
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku(server)
    assert spki(private_key(root / "broker/server.key").public_key()) == spki(server.public_key())  # type: ignore[attr-defined]

    # The hub's own client identity.
    hub_cert = cert(root / "pki/hub.crt")
    assert cn(hub_cert) == f"hub.{region}"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku(hub_cert)
    assert hub_cert.issuer == ca_cert.subject
    hub_cert.verify_directly_issued_by(ca_cert)
    assert spki(private_key(root / "pki/hub.key").public_key()) == spki(hub_cert.public_key())  # type: ignore[attr-defined]

    # An (empty) CRL signed by the CA.
    crl = x509.load_pem_x509_crl((root / "pki/crl.pem").read_bytes())
    assert crl.issuer == ca_cert.subject
    assert crl.is_signature_valid(ca_pub)
    assert len(crl) == 0

    # Mosquitto: the port, mutual TLS, identity from the certificate, the CRL.
    conf = (root / "broker/mosquitto.conf").read_text()
    lines = [line.strip() for line in conf.splitlines()]
    assert any(re.fullmatch(rf"listener {port}(\s.*)?", line) for line in lines), conf
    for required in ("require_certificate true", "use_identity_as_username true", "use_username_as_clientid true"):
        assert required in lines, f"{required!r} not in mosquitto.conf:\n{conf}"
    crl_lines = [line for line in lines if line.startswith("crlfile ")]
    assert crl_lines, conf
    assert Path(crl_lines[0].split(None, 1)[1]).resolve() == (root / "pki/crl.pem").resolve()

    hub_toml = tomllib.loads((root / "hub.toml").read_text())
    assert hub_toml["region"] == region
    assert hub_toml["broker"]["port"] == port
    assert hub_toml["broker"]["host"] == host


async def test_init_again_without_force_changes_nothing(workdir: Path) -> None:
    root = workdir / "hub"
    code, _, err = await init(root, "eu", free_port())
    assert code == 0, err
    before = snapshot(root)

    code, _, err = await init(root, "other", free_port())
    assert code == 2
    assert "--force" in err
    assert "Traceback" not in err
    assert snapshot(root) == before


async def test_init_force_moves_the_old_hub_aside_and_makes_a_new_ca(workdir: Path) -> None:
    root = workdir / "hub"
    code, _, err = await init(root, "eu", free_port())
    assert code == 0, err
    before = snapshot(root)

    code, _, err = await init(root, "eu", free_port(), "--force")
    assert code == 0, err

    aside = sorted(root.glob("replaced-*"))
    assert len(aside) == 1
    assert aside[0].is_dir()
    moved = snapshot(aside[0])
    for rel, data in before.items():
        assert moved.get(rel) == data, f"{rel} was not kept in {aside[0].name}"

    for rel in INIT_FILES:
        assert (root / rel).is_file(), f"{rel} is missing after --force"
    old_ca = x509.load_pem_x509_certificate(before["pki/ca.crt"])
    new_ca = cert(root / "pki/ca.crt")
    assert spki(new_ca.public_key()) != spki(old_ca.public_key())
    assert (root / "pki/ca.key").read_bytes() != before["pki/ca.key"]
    cert(root / "pki/hub.crt").verify_directly_issued_by(new_ca)
    for rel in PRIVATE_KEYS:
        assert mode(root / rel) == 0o600


async def test_init_force_invalidates_bundles_of_the_old_ca(hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-1")
    old = (bundles / "dev-1/device.crt").read_bytes()
    code, _, err = await init(hub_dir.dir, hub_dir.region, hub_dir.port, "--force")
    assert code == 0, err

    code, _, err = await provision(hub_dir, bundles, "--profile", "sim", "dev-1")
    assert code == 0, err
    new = cert(bundles / "dev-1/device.crt")
    assert new.public_bytes(serialization.Encoding.PEM) != old
    new.verify_directly_issued_by(cert(hub_dir.pki / "ca.crt"))
    assert (bundles / "dev-1/ca.crt").read_bytes() == (hub_dir.pki / "ca.crt").read_bytes()


async def test_init_force_twice_within_a_second(workdir: Path) -> None:
    root = workdir / "hub"
    code, _, err = await init(root, "eu", free_port())
    assert code == 0, err
    # What a second `--force` within the same second finds: the aside folder of that second taken.
    now = time.time()
    for offset in range(-2, 30):
        (root / f"replaced-{time.strftime('%Y%m%dT%H%M%S', time.localtime(now + offset))}").mkdir(exist_ok=True)
    before = snapshot(root)
    code, _, err = await init(root, "eu", free_port(), "--force")
    assert code == 0, err
    moved = [snapshot(d) for d in root.glob("replaced-*")]
    assert any(m.get("pki/ca.key") == before["pki/ca.key"] for m in moved)


@pytest.mark.parametrize("region", ["bad region", "eu/west", "x" * 65, "a+b", ""])
async def test_init_refuses_a_bad_region(workdir: Path, region: str) -> None:
    root = workdir / "hub"
    code, _, err = await init(root, region, free_port())
    assert code == 2
    assert "region" in err
    assert NAME_RULE in err
    assert "Traceback" not in err
    assert not root.exists()


@pytest.mark.parametrize("port", [0, 70000])
async def test_init_refuses_a_bad_port(workdir: Path, port: int) -> None:
    root = workdir / "hub"
    code, _, err = await init(root, "eu", port)
    assert code == 2, err
    assert "port" in err
    assert not (root / "hub.toml").exists()


# --- edge-hub provision -----------------------------------------------------------------


async def test_provision_writes_a_relocatable_bundle(hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    code, out, err = await provision(hub_dir, bundles, "--profile", "sim", "dev-1")
    assert code == 0, err
    assert "1 device bundle" in out
    bundle = bundles / "dev-1"
    assert sorted(p.name for p in bundle.iterdir()) == sorted(BUNDLE_FILES)
    assert mode(bundle / "device.key") == 0o600

    ca = cert(hub_dir.pki / "ca.crt")
    assert (bundle / "ca.crt").read_bytes() == (hub_dir.pki / "ca.crt").read_bytes()
    device = cert(bundle / "device.crt")
    assert cn(device) == "dev-1"
    assert device.issuer == ca.subject
    device.verify_directly_issued_by(ca)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku(device)
    assert spki(private_key(bundle / "device.key").public_key()) == spki(device.public_key())  # type: ignore[attr-defined]

    raw = tomllib.loads((bundle / "agent.toml").read_text())
    assert raw["device_id"] == "dev-1"
    assert raw["broker"]["port"] == hub_dir.port
    for name in ("ca", "cert", "key"):
        assert not Path(raw["tls"][name]).is_absolute(), raw["tls"]
    assert not Path(raw["state"]["dir"]).is_absolute()
    settings = load_settings(bundle / "agent.toml")
    assert settings.config.device_id == "dev-1"
    assert settings.profile.name == "sim"
    assert settings.tls.cert == bundle.resolve() / "device.crt"

    # Move the folder elsewhere, remove the original place: it still loads, from where it is now.
    target = workdir / "elsewhere" / "etc-edge-agent"
    target.parent.mkdir()
    shutil.move(str(bundle), str(target))
    shutil.rmtree(bundles)
    moved = load_settings(target / "agent.toml")
    tls = moved.tls
    for path, name in ((tls.ca, "ca.crt"), (tls.cert, "device.crt"), (tls.key, "device.key")):
        assert path == target.resolve() / name
        assert path.is_file()
    assert moved.state_dir == target.resolve() / "state"

    # The real `edge-agent check` agrees: config, key, identity and clock are fine (no broker runs).
    code, out, err = await run_cli(AGENT, "check", "--config", str(target / "agent.toml"))
    assert code == 1, out + err
    for check in ("config", "key permissions", "identity", "clock"):
        assert re.search(rf"^ok\s+{check}:", out, re.MULTILINE), out


async def test_provision_is_idempotent_and_reissue_makes_a_new_certificate(hub_dir: HubDir, bundles: Path) -> None:
    argv = ("--profile", "sim", "dev-1", "dev-2")
    code, _, err = await provision(hub_dir, bundles, *argv)
    assert code == 0, err
    first = {d: snapshot(bundles / d) for d in ("dev-1", "dev-2")}

    code, out, err = await provision(hub_dir, bundles, *argv)
    assert code == 0, err
    assert "kept" in out
    for d in ("dev-1", "dev-2"):
        again = snapshot(bundles / d)
        assert again["device.crt"] == first[d]["device.crt"]
        assert again["device.key"] == first[d]["device.key"]
    assert set(await device_rows(hub_dir.dir)) == {"dev-1", "dev-2"}

    code, _, err = await provision(hub_dir, bundles, "--reissue", *argv)
    assert code == 0, err
    ca = cert(hub_dir.pki / "ca.crt")
    for d in ("dev-1", "dev-2"):
        new = cert(bundles / d / "device.crt")
        old = x509.load_pem_x509_certificate(first[d]["device.crt"])
        assert new.serial_number != old.serial_number
        assert cn(new) == d
        new.verify_directly_issued_by(ca)
        assert spki(private_key(bundles / d / "device.key").public_key()) == spki(new.public_key())  # type: ignore[attr-defined]
        assert mode(bundles / d / "device.key") == 0o600


async def test_provision_accepts_ids_at_the_edge_of_the_rule(hub_dir: HubDir, bundles: Path) -> None:
    ids = ["x" * 64, "A_b-9", "7"]
    code, _, err = await provision(hub_dir, bundles, "--profile", "sim", *ids)
    assert code == 0, err
    for d in ids:
        assert cn(cert(bundles / d / "device.crt")) == d
    assert set(await device_rows(hub_dir.dir)) == set(ids)


@pytest.mark.parametrize("bad", ["bad/id", "a+b", "x" * 65, "sp ace"])
async def test_provision_refuses_bad_ids_and_writes_nothing(hub_dir: HubDir, workdir: Path, bad: str) -> None:
    out = workdir / "out"
    code, _, err = await provision(hub_dir, out, "--profile", "sim", "good-1", bad, "good-2")
    assert code == 2
    assert NAME_RULE in err
    assert repr(bad) in err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*"))
    assert await device_rows(hub_dir.dir) == {}


async def test_provision_refuses_an_unknown_profile(hub_dir: HubDir, workdir: Path) -> None:
    out = workdir / "out"
    code, _, err = await provision(hub_dir, out, "--profile", "no-such-board", "dev-1")
    assert code == 2
    assert "no-such-board" in err
    profiles = available_profiles()
    assert "sim" in profiles
    assert "generic-linux" in profiles
    for name in profiles:
        assert name in err
    assert not out.exists() or not any(out.rglob("*"))
    assert await device_rows(hub_dir.dir) == {}


async def test_provision_tags_land_in_agent_toml_and_devices(hub_dir: HubDir, bundles: Path) -> None:
    code, _, err = await provision(
        hub_dir, bundles, "--profile", "sim", "--tag", "site=lab", "--tag", "rack=3", "dev-1", "dev-2"
    )
    assert code == 0, err
    rows = await device_rows(hub_dir.dir)
    for d in ("dev-1", "dev-2"):
        raw = tomllib.loads((bundles / d / "agent.toml").read_text())
        assert raw["tags"] == {"site": "lab", "rack": "3"}
        assert load_settings(bundles / d / "agent.toml").config.tags == {"site": "lab", "rack": "3"}
        assert rows[d]["tags"] == {"site": "lab", "rack": "3"}


async def test_provision_refuses_a_malformed_tag(hub_dir: HubDir, workdir: Path) -> None:
    out = workdir / "out"
    code, _, err = await provision(hub_dir, out, "--tag", "novalue", "dev-1")
    assert code == 2
    assert "key=value" in err
    assert not out.exists()


async def test_provision_from_an_inventory(hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    inventory = workdir / "fleet.csv"
    inventory.write_text("device,profile,tags\ninv-1,sim,site=a;rack=3\ninv-2,generic-linux,site=b\ninv-3,,\n")
    code, out, err = await provision(hub_dir, bundles, "--profile", "rpi-4", "--inventory", str(inventory))
    assert code == 0, err
    assert "3 device bundle" in out
    expected = {
        "inv-1": ("sim", {"site": "a", "rack": "3"}),
        "inv-2": ("generic-linux", {"site": "b"}),
        "inv-3": ("rpi-4", {}),
    }
    rows = await device_rows(hub_dir.dir)
    assert set(rows) == set(expected)
    for d, (profile, tags) in expected.items():
        raw = tomllib.loads((bundles / d / "agent.toml").read_text())
        assert raw["profile"] == profile
        assert raw.get("tags", {}) == tags
        assert cn(cert(bundles / d / "device.crt")) == d
        assert mode(bundles / d / "device.key") == 0o600
        assert rows[d]["profile"] == profile
        assert rows[d]["tags"] == tags


async def test_provision_inventory_header_named_as_in_the_spec(hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    inventory = workdir / "fleet.csv"
    inventory.write_text("device id,profile,tags\ninv-1,sim,site=a;rack=3\n")
    code, _, err = await provision(hub_dir, bundles, "--inventory", str(inventory))
    assert code == 0, err
    rows = await device_rows(hub_dir.dir)
    assert rows["inv-1"]["tags"] == {"site": "a", "rack": "3"}


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
async def test_provision_from_a_csr(
    hub_dir: HubDir, bundles: Path, workdir: Path, encoding: serialization.Encoding
) -> None:
    key, request = make_csr("dev-csr", encoding)
    csr_file = workdir / "dev-csr.csr"
    csr_file.write_bytes(request)
    code, _, err = await provision(hub_dir, bundles, "--profile", "sim", "--csr", str(csr_file), "dev-csr")
    assert code == 0, err
    bundle = bundles / "dev-csr"
    assert not (bundle / "device.key").exists()
    assert sorted(p.name for p in bundle.iterdir()) == ["agent.toml", "ca.crt", "device.crt", "policy.pub"]
    device = cert(bundle / "device.crt")
    assert cn(device) == "dev-csr"
    assert spki(device.public_key()) == spki(key.public_key())
    device.verify_directly_issued_by(cert(hub_dir.pki / "ca.crt"))
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku(device)
    settings = load_settings(bundle / "agent.toml")
    assert settings.tls.key == bundle.resolve() / "device.key"  # where the device puts its own key
    assert "dev-csr" in await device_rows(hub_dir.dir)


async def test_provision_from_a_csr_is_idempotent(hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    _, request = make_csr("dev-csr")
    csr_file = workdir / "dev-csr.csr"
    csr_file.write_bytes(request)
    argv = ("--profile", "sim", "--csr", str(csr_file), "dev-csr")
    code, _, err = await provision(hub_dir, bundles, *argv)
    assert code == 0, err
    first = (bundles / "dev-csr/device.crt").read_bytes()
    code, _, err = await provision(hub_dir, bundles, *argv)
    assert code == 0, err
    assert (bundles / "dev-csr/device.crt").read_bytes() == first


async def test_provision_refuses_a_csr_for_another_id(hub_dir: HubDir, workdir: Path) -> None:
    _, request = make_csr("someone-else")
    csr_file = workdir / "x.csr"
    csr_file.write_bytes(request)
    out = workdir / "out"
    code, _, err = await provision(hub_dir, out, "--profile", "sim", "--csr", str(csr_file), "dev-csr")
    assert code == 2
    assert "someone-else" in err
    assert "CN=dev-csr" in err
    assert "Traceback" not in err
    assert not (out / "dev-csr" / "device.crt").exists()
    assert await device_rows(hub_dir.dir) == {}


async def test_provision_refuses_a_csr_with_two_ids(hub_dir: HubDir, workdir: Path) -> None:
    _, request = make_csr("dev-a")
    csr_file = workdir / "a.csr"
    csr_file.write_bytes(request)
    out = workdir / "out"
    code, _, err = await provision(hub_dir, out, "--profile", "sim", "--csr", str(csr_file), "dev-a", "dev-b")
    assert code == 2
    assert "--csr" in err
    assert not out.exists()
    assert await device_rows(hub_dir.dir) == {}


async def test_provision_refuses_a_file_that_is_not_a_csr(hub_dir: HubDir, workdir: Path) -> None:
    junk = workdir / "junk.csr"
    junk.write_text("not a request\n")
    code, _, err = await provision(hub_dir, workdir / "out", "--csr", str(junk), "dev-a")
    assert code == 2
    assert "certificate request" in err
    assert "Traceback" not in err


async def test_revoked_device_needs_reissue_to_come_back(hub_dir: HubDir, bundles: Path) -> None:
    code, _, err = await provision(hub_dir, bundles, "--profile", "sim", "dev-r")
    assert code == 0, err
    revoked_cert = cert(bundles / "dev-r/device.crt")
    before = snapshot(bundles / "dev-r")

    code, out, err = await hub_cmd("revoke", "--dir", str(hub_dir.dir), "dev-r", timeout=30)
    assert code == 0, err
    assert "revoked dev-r" in out
    ca = cert(hub_dir.pki / "ca.crt")
    crl = x509.load_pem_x509_crl((hub_dir.pki / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(revoked_cert.serial_number) is not None
    row = (await device_rows(hub_dir.dir))["dev-r"]
    assert row["online"] is False

    code, _, err = await provision(hub_dir, bundles, "--profile", "sim", "dev-r")
    assert code == 2
    assert "revoked" in err
    assert "--reissue" in err
    assert snapshot(bundles / "dev-r") == before

    code, _, err = await provision(hub_dir, bundles, "--profile", "sim", "--reissue", "dev-r")
    assert code == 0, err
    readmitted = cert(bundles / "dev-r/device.crt")
    assert readmitted.serial_number != revoked_cert.serial_number
    readmitted.verify_directly_issued_by(ca)
    crl = x509.load_pem_x509_crl((hub_dir.pki / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(readmitted.serial_number) is None
    row = (await device_rows(hub_dir.dir))["dev-r"]
    assert row["cert_expires"] is not None
    assert row.get("revoked", False) is False

    # Re-admitted means an ordinary re-run is idempotent again.
    code, _, err = await provision(hub_dir, bundles, "--profile", "sim", "dev-r")
    assert code == 0, err
    assert cert(bundles / "dev-r/device.crt").serial_number == readmitted.serial_number


async def test_revoke_an_unknown_device(hub_dir: HubDir) -> None:
    code, _, err = await hub_cmd("revoke", "--dir", str(hub_dir.dir), "nobody")
    assert code == 2
    assert "nobody" in err


# --- edge-hub devices -------------------------------------------------------------------

DEVICE_FIELDS = (
    "device",
    "profile",
    "tags",
    "online",
    "last_seen",
    "policy_version",
    "backlog",
    "dropped",
    "cert_expires",
)


async def test_devices_json_one_object_per_line(hub_dir: HubDir, bundles: Path) -> None:
    code, out, err = await hub_cmd("devices", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    assert out.strip() == ""

    code, _, err = await provision(hub_dir, bundles, "--profile", "sim", "--tag", "site=lab", "dev-1", "dev-2")
    assert code == 0, err
    code, out, err = await hub_cmd("devices", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    now = dt.datetime.now(dt.UTC)
    for line, device in zip(lines, ("dev-1", "dev-2"), strict=True):
        row = json.loads(line)
        assert isinstance(row, dict)
        for name in DEVICE_FIELDS:
            assert name in row, f"{name} missing from {row}"
        assert row["device"] == device
        assert row["profile"] == "sim"
        assert row["tags"] == {"site": "lab"}
        assert row["online"] is False
        assert row["last_seen"] is None
        for name in ("policy_version", "backlog", "dropped"):
            assert row[name] is None or isinstance(row[name], int)
        expires = dt.datetime.fromisoformat(row["cert_expires"])
        assert expires.tzinfo is not None
        expected = cert(bundles / device / "device.crt").not_valid_after_utc
        assert abs((expires - expected).total_seconds()) <= 1
        assert dt.timedelta(days=80) < expires - now <= dt.timedelta(days=91)


async def test_devices_table(hub_dir: HubDir, bundles: Path) -> None:
    code, _, err = await provision(hub_dir, bundles, "--profile", "sim", "--tag", "site=lab", "d1", "d2")
    assert code == 0, err
    code, out, err = await hub_cmd("devices", "--dir", str(hub_dir.dir))
    assert code == 0, err
    for word in ("device", "profile", "online", "d1", "d2", "sim", "site=lab"):
        assert word in out, out
    assert "2 device(s), 0 online" in out


async def test_devices_table_piped_shows_whole_device_ids(hub_dir: HubDir, bundles: Path) -> None:
    ids = ["sensor-warehouse-0001", "sensor-warehouse-0002"]
    code, _, err = await provision(
        hub_dir, bundles, "--profile", "generic-linux", "--tag", "site=berlin-north", "--tag", "rack=17", *ids
    )
    assert code == 0, err
    code, out, err = await run_cli(HUB, "devices", "--dir", str(hub_dir.dir))
    assert code == 0, err
    for d in ids:
        assert d in out, out


# --- help and "not a hub" ---------------------------------------------------------------

HELP_CASES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    ((HUB, "--help"), ("--version", "--verbose", "init", "provision", "revoke", "run", "devices")),
    ((HUB, "init", "--help"), ("--dir", "--region", "--port", "--host", "--bind", "--force")),
    (
        (HUB, "provision", "--help"),
        ("--dir", "--out", "--profile", "--tag", "--inventory", "--csr", "--reissue", "DEVICE_ID"),
    ),
    ((HUB, "revoke", "--help"), ("--dir", "DEVICE_ID")),
    ((HUB, "run", "--help"), ("--dir",)),
    ((HUB, "devices", "--help"), ("--dir", "--json")),
    ((AGENT, "--help"), ("--version", "run", "check")),
    ((AGENT, "run", "--help"), ("--config", "--set", "--log-level")),
    ((AGENT, "check", "--help"), ("--config", "--set")),
]


@pytest.mark.parametrize(
    ("argv", "mentions"), HELP_CASES, ids=[" ".join([Path(argv[0]).name, *argv[1:]]) for argv, _ in HELP_CASES]
)
async def test_help(argv: tuple[str, ...], mentions: tuple[str, ...]) -> None:
    code, out, err = await run_cli(*argv, env={"COLUMNS": "120"})
    assert code == 0, err
    for word in mentions:
        assert word in out, f"{word!r} not in {' '.join(argv[1:])} help:\n{out}"


def _all_options(parser: object) -> dict[str, set[str]]:
    """Every option string of every sub-command of an argparse parser."""
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    found: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = {o for a in sub._actions for o in a.option_strings if o not in ("-h", "--help")}
    return found


@pytest.mark.parametrize("program", ["edge-hub", "edge-agent"])
async def test_help_mentions_every_option_the_parser_has(program: str) -> None:
    if program == "edge-hub":
        from hub.cli.main import _parser

        exe = HUB
    else:
        from edge_agent.cli import _parser

        exe = AGENT
    options = _all_options(_parser())
    assert options
    for command, opts in options.items():
        code, out, err = await run_cli(exe, command, "--help", env={"COLUMNS": "120"})
        assert code == 0, err
        for opt in opts:
            assert opt in out, f"{program} {command} --help does not mention {opt}"


@pytest.mark.parametrize(
    "command",
    [("provision", "--out", "OUT", "dev-1"), ("revoke", "dev-1"), ("run",), ("devices",), ("devices", "--json")],
)
@pytest.mark.parametrize("exists", [True, False])
async def test_commands_against_a_directory_that_is_not_a_hub(
    workdir: Path, command: tuple[str, ...], exists: bool
) -> None:
    target = workdir / "not-a-hub"
    if exists:
        target.mkdir()
        (target / "something.txt").write_text("hello\n")
    argv = [str(workdir / "out") if a == "OUT" else a for a in command]
    code, out, err = await run_cli(HUB, argv[0], "--dir", str(target), *argv[1:], timeout=30)
    assert code == 2, out + err
    assert "edge-hub init" in err
    assert "Traceback" not in err
    assert not (workdir / "out").exists()
    if exists:
        assert sorted(p.name for p in target.iterdir()) == ["something.txt"]
    else:
        assert not target.exists()


# --- edge-agent configuration errors -----------------------------------------------------


@pytest.mark.parametrize("command", ["run", "check"])
async def test_agent_missing_config(workdir: Path, command: str) -> None:
    missing = workdir / "missing.toml"
    code, out, err = await run_cli(AGENT, command, "--config", str(missing), timeout=30)
    assert code == 2, out + err
    assert "configuration error" in err
    assert str(missing) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "check"])
async def test_agent_unknown_setting_names_the_valid_ones(hub_dir: HubDir, bundles: Path, command: str) -> None:
    await hub_dir.provision(bundles, "dev-1")
    code, out, err = await run_cli(
        AGENT, command, "--config", str(bundles / "dev-1/agent.toml"), "--set", "nonsense.key=1", timeout=30
    )
    assert code == 2, out + err
    assert "configuration error" in err
    assert "nonsense" in err
    for key in sorted(CONFIG_KEYS | PROFILE_KEYS):
        assert key in err, f"valid setting {key!r} not named in: {err}"
    assert "Traceback" not in err


@pytest.mark.parametrize("override", ["novalue", "broker.port=notaport", "broker.port=70000", "sim.rate_hz=-1"])
async def test_agent_bad_override_is_a_configuration_error(hub_dir: HubDir, bundles: Path, override: str) -> None:
    await hub_dir.provision(bundles, "dev-1")
    code, out, err = await run_cli(
        AGENT, "run", "--config", str(bundles / "dev-1/agent.toml"), "--set", override, timeout=30
    )
    assert code == 2, out + err
    assert "configuration error" in err
    assert "Traceback" not in err


async def test_agent_broken_config_file(workdir: Path) -> None:
    config = workdir / "agent.toml"
    config.write_text('device_id = "dev-1"\nprofile = "sim"\n[broker]\nhost = "h"\nbogus = 1\n')
    code, out, err = await run_cli(AGENT, "run", "--config", str(config), timeout=30)
    assert code == 2, out + err
    assert "configuration error" in err
    assert "bogus" in err
    config.write_text("this is = = not toml")
    code, out, err = await run_cli(AGENT, "run", "--config", str(config), timeout=30)
    assert code == 2, out + err
    assert "TOML" in err



def run_into_a_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command whose stdout reader has already gone, as `cmd | head -0` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("listing", [("events",), ("events", "--json"), ("devices",)],
                         ids=["events", "events-json", "devices-rich-table"])
async def test_a_listing_whose_reader_left_ends_quietly_with_141(hub_dir: HubDir, listing: tuple[str, ...]) -> None:
    """`edge-hub events | head`: once the reader has gone, no traceback, and the status a C tool
    ended by SIGPIPE gives (128 + 13). Enough events that the output passes any pipe buffer."""
    code, _, err = await run_cli(HUB, "devices", "--dir", str(hub_dir.dir))  # hub.db exists from here
    assert code == 0, err
    db = sqlite3.connect(hub_dir.dir / "hub.db")
    with db:
        db.executemany("INSERT INTO events(device, seq, ts, kind, body) VALUES ('dev-1', ?, ?, 'alert', ?)",
                       [(seq, 1.7e9 + seq, json.dumps({"message": "x" * 100})) for seq in range(1, 5001)])
    db.close()
    command = [HUB, listing[0], "--dir", str(hub_dir.dir), *listing[1:]]
    code, out, err = await run_cli(*command)
    assert code == 0, err
    if listing[0] == "events":
        assert len(out.splitlines()) == 5000
    done = await asyncio.to_thread(run_into_a_closed_pipe, *command)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr
    assert "Exception ignored" not in done.stderr
