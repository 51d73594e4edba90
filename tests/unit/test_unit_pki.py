"""The fleet PKI without a broker: what each certificate lets its holder do, and what is refused."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.runtime.files import write_atomic
from hub.errors import UsageError
from hub.pki.authority import Authority, cert_pem, common_name, key_pem, utcnow

DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority.create("eu-1")


def _verify(ca: Authority, cert: x509.Certificate) -> None:
    """Raise unless `cert` is signed by the CA's key."""
    cert.verify_directly_issued_by(ca.cert)


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _csr(key: CertificateIssuerPrivateKeyTypes, cn: str | None) -> x509.CertificateSigningRequest:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme")
    ]
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(key, algorithm)


# --- the CA --------------------------------------------------------------------------


def test_the_ca_is_a_self_signed_ca_that_may_sign_certificates_and_crls(ca: Authority) -> None:
    _verify(ca, ca.cert)
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert "eu-1" in common_name(ca.cert)
    assert ca.cert.not_valid_before_utc <= utcnow() < ca.cert.not_valid_after_utc


def test_each_fleet_gets_its_own_ca() -> None:
    a, b = Authority.create("eu-1"), Authority.create("eu-1")
    _, cert = a.issue_client("dev-1", DAY)
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(b.cert)


def test_the_ca_survives_a_round_trip_through_files(ca: Authority, tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(key_pem(ca.key))
    (tmp_path / "ca.crt").write_bytes(cert_pem(ca.cert))
    loaded = Authority.load(tmp_path / "ca.key", tmp_path / "ca.crt")
    _, cert = loaded.issue_client("dev-1", DAY)
    _verify(ca, cert)


def test_loading_a_non_ecdsa_ca_key_is_refused(ca: Authority, tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(key_pem(ed25519.Ed25519PrivateKey.generate()))
    (tmp_path / "ca.crt").write_bytes(cert_pem(ca.cert))
    with pytest.raises(UsageError, match="not an ECDSA CA key"):
        Authority.load(tmp_path / "ca.key", tmp_path / "ca.crt")


# --- server certificates -------------------------------------------------------------


def test_the_server_certificate_names_every_host_and_address(ca: Authority) -> None:
    key, cert = ca.issue_server(["hub.example.net", "127.0.0.1", "::1", "hub.example.net", "localhost"])
    _verify(ca, cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.example.net", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
    ]
    assert common_name(cert) == "hub.example.net"
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.public_key() == key.public_key()


def test_the_server_certificate_is_not_a_ca(ca: Authority) -> None:
    _, cert = ca.issue_server(["localhost"])
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_before_utc <= utcnow() < cert.not_valid_after_utc


# --- client certificates -------------------------------------------------------------


def test_a_client_certificate_carries_the_identity_and_client_auth_only(ca: Authority) -> None:
    key, cert = ca.issue_client("dev-1", 30 * DAY)
    assert key is not None
    _verify(ca, cert)
    assert common_name(cert) == "dev-1"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.public_key() == key.public_key()
    lifetime = cert.not_valid_after_utc - utcnow()
    assert 29 * DAY < lifetime <= 30 * DAY


def test_a_client_certificate_is_valid_now_even_for_a_device_whose_clock_lags(ca: Authority) -> None:
    _, cert = ca.issue_client("dev-1", DAY)
    assert cert.not_valid_before_utc <= utcnow() - dt.timedelta(minutes=1)


def test_a_client_certificate_never_outlives_the_ca(ca: Authority) -> None:
    _, cert = ca.issue_client("dev-1", dt.timedelta(days=365 * 50))
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_a_client_certificate_for_a_given_public_key_has_no_new_key(ca: Authority) -> None:
    device_key = ec.generate_private_key(ec.SECP256R1())
    key, cert = ca.issue_client("dev-1", DAY, device_key.public_key())
    assert key is None
    assert cert.public_key() == device_key.public_key()


def test_serial_numbers_are_unique(ca: Authority) -> None:
    serials = {ca.issue_client("dev-1", DAY)[1].serial_number for _ in range(20)}
    assert len(serials) == 20


# --- CSR signing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
    ids=["p256", "p384", "rsa2048"],
)
def test_a_good_csr_is_signed_for_the_device(ca: Authority, make_key) -> None:  # type: ignore[no-untyped-def]
    device_key = make_key()
    cert = ca.sign_request(_csr(device_key, "dev-7"), "dev-7", 10 * DAY)
    _verify(ca, cert)
    assert common_name(cert) == "dev-7"
    assert cert.public_key() == device_key.public_key()
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_csr_for_another_device_is_refused(ca: Authority) -> None:
    csr = _csr(ec.generate_private_key(ec.SECP256R1()), "dev-other")
    with pytest.raises(UsageError) as info:
        ca.sign_request(csr, "dev-7", DAY)
    message = str(info.value)
    assert "'dev-other'" in message
    assert "'dev-7'" in message
    assert "CN=dev-7" in message


def test_a_csr_without_a_common_name_is_refused(ca: Authority) -> None:
    csr = _csr(ec.generate_private_key(ec.SECP256R1()), None)
    with pytest.raises(UsageError, match="no CN"):
        ca.sign_request(csr, "dev-7", DAY)


def test_a_csr_with_two_common_names_is_refused(ca: Authority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "dev-7"),
        x509.NameAttribute(NameOID.COMMON_NAME, "hub.eu-1"),
    ])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    with pytest.raises(UsageError):
        ca.sign_request(csr, "dev-7", DAY)


def test_a_csr_with_a_broken_signature_is_refused(ca: Authority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = bytearray(_csr(key, "dev-7").public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0xFF  # the last byte belongs to the RSA signature
    csr = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(UsageError, match="signature is invalid"):
        ca.sign_request(csr, "dev-7", DAY)


def test_a_weak_rsa_key_is_refused(ca: Authority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(UsageError) as info:
        ca.sign_request(_csr(key, "dev-7"), "dev-7", DAY)
    assert "RSA 1024" in str(info.value)
    assert "too weak" in str(info.value)


def test_an_ed25519_key_is_refused(ca: Authority) -> None:
    csr = _csr(ed25519.Ed25519PrivateKey.generate(), "dev-7")
    with pytest.raises(UsageError) as info:
        ca.sign_request(csr, "dev-7", DAY)
    assert "ECDSA" in str(info.value)
    assert "RSA" in str(info.value)


def test_an_unaccepted_curve_is_refused(ca: Authority) -> None:
    csr = _csr(ec.generate_private_key(ec.SECP521R1()), "dev-7")
    with pytest.raises(UsageError, match="P-256 or P-384"):
        ca.sign_request(csr, "dev-7", DAY)


# --- CRL -----------------------------------------------------------------------------


def test_the_crl_lists_revoked_serials_and_says_when_the_next_one_comes(ca: Authority) -> None:
    when = utcnow().replace(microsecond=0)
    _, one = ca.issue_client("dev-1", DAY)
    _, two = ca.issue_client("dev-2", DAY)
    _, kept = ca.issue_client("dev-3", DAY)
    crl = ca.issue_crl([(one.serial_number, when), (two.serial_number, when)], dt.timedelta(hours=6))
    assert crl.is_signature_valid(ca.key.public_key())
    assert crl.issuer == ca.cert.subject
    assert {r.serial_number for r in crl} == {one.serial_number, two.serial_number}
    entry = crl.get_revoked_certificate_by_serial_number(one.serial_number)
    assert entry is not None
    assert entry.revocation_date_utc == when
    assert crl.get_revoked_certificate_by_serial_number(kept.serial_number) is None
    assert crl.next_update_utc is not None
    remaining = crl.next_update_utc - utcnow()
    assert dt.timedelta(hours=5) < remaining <= dt.timedelta(hours=6)
    assert crl.last_update_utc <= utcnow()


def test_an_empty_crl_is_still_valid(ca: Authority) -> None:
    crl = ca.issue_crl([], DAY)
    assert len(crl) == 0
    assert crl.is_signature_valid(ca.key.public_key())


# --- files ---------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_write_atomic_applies_the_mode(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "device.key"
    write_atomic(target, b"secret", mode)
    assert target.read_bytes() == b"secret"
    assert _mode(target) == mode


def test_write_atomic_replaces_old_content_and_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "device.key"
    target.write_bytes(b"old content that is longer than the new one")
    target.chmod(0o644)
    write_atomic(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]


def test_write_atomic_makes_missing_folders(tmp_path: Path) -> None:
    target = tmp_path / "out" / "dev-1" / "agent.toml"
    write_atomic(target, b"x = 1\n", 0o644)
    assert target.read_bytes() == b"x = 1\n"


def test_a_failed_write_atomic_leaves_no_temp_file_and_harms_nothing(tmp_path: Path) -> None:
    # The target is a non-empty folder: the final rename fails.
    target = tmp_path / "agent.toml"
    target.mkdir()
    (target / "keep").write_bytes(b"keep")
    with pytest.raises(OSError):  # noqa: PT011 - which OSError depends on the platform
        write_atomic(target, b"new", 0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]
    assert (target / "keep").read_bytes() == b"keep"


def test_write_atomic_with_owner_sets_it(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"x", 0o600, owner=(os.getuid(), os.getgid()))
    assert (target.stat().st_uid, target.stat().st_gid) == (os.getuid(), os.getgid())
