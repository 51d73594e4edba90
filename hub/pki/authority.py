"""The fleet PKI: CA, broker and client certificates, CSR signing, CRL. Pure crypto, no I/O
beyond the file helpers at the bottom."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.runtime.files import permission_advice
from hub.errors import UsageError

CA_LIFETIME: Final = dt.timedelta(days=3650)  # re-rooting a fleet is an operation, not a routine
SERVER_CERT_LIFETIME: Final = dt.timedelta(days=397)  # the longest browsers accept; habit
# Issued certificates start a little in the past: a device whose clock is slightly behind
# the hub must not see a certificate that is "not yet valid".
BACKDATE: Final = dt.timedelta(minutes=5)
# ... but never by more than this share of the lifetime: an agent renews two thirds into
# (not_after - not_before), and a 30 s certificate backdated 5 minutes would be due at once.
BACKDATE_SHARE: Final = 0.1

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, region: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if region:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, region))
    return x509.Name(attrs)


class CsrRefused(UsageError):
    """A certificate request that cannot be signed; `reason` is the short name devices are told."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Authority:
    """The fleet CA: signs every certificate and the CRL."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, region: str) -> Authority:
        key = new_ec_key()
        name = _name(f"edgefleet fleet CA {region}", region)
        now = utcnow()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, key_path: Path, cert_path: Path) -> Authority:
        """The CA from its files; UsageError in one sentence when they cannot be read or used."""
        try:
            key = serialization.load_pem_private_key(read_key_file(key_path, "the fleet CA key"), password=None)
        except ValueError:
            raise UsageError(f"{key_path} is not a PEM private key: restore it from the hub's backup") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise UsageError(f"{key_path} is not an ECDSA CA key")
        try:
            cert = x509.load_pem_x509_certificate(read_key_file(cert_path, "the fleet CA certificate"))
        except ValueError:
            raise UsageError(f"{cert_path} is not a PEM certificate: restore it from the hub's backup") from None
        return cls(key, cert)

    def _issue(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        lifetime: dt.timedelta,
        eku: x509.ObjectIdentifier,
        san: list[x509.GeneralName] | None = None,
    ) -> x509.Certificate:
        now = utcnow()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - min(BACKDATE, lifetime * BACKDATE_SHARE))
            .not_valid_after(min(now + lifetime, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_server(
        self, hosts: Iterable[str], lifetime: dt.timedelta = SERVER_CERT_LIFETIME,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The broker's certificate, with a SAN entry for every host name and address; a new
        key unless one is given (a renewal keeps the key: the certificate is then one file to replace)."""
        names: list[x509.GeneralName] = []
        hosts = list(dict.fromkeys(hosts))
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        key = key or new_ec_key()
        cert = self._issue(_name(hosts[0]), key.public_key(), lifetime, ExtendedKeyUsageOID.SERVER_AUTH, names)
        return key, cert

    def issue_client(
        self, cn: str, lifetime: dt.timedelta,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey | None, x509.Certificate]:
        """A client certificate whose CN is the MQTT identity; a new key unless one is given."""
        key = None
        if public_key is None:
            key = new_ec_key()
            public_key = key.public_key()
        return key, self._issue(_name(cn), public_key, lifetime, ExtendedKeyUsageOID.CLIENT_AUTH)

    def sign_request(self, csr: x509.CertificateSigningRequest, cn: str, lifetime: dt.timedelta) -> x509.Certificate:
        """Sign a device's CSR for identity `cn`; the CSR must be self-signed and name `cn`.
        Raises CsrRefused (a UsageError) saying why not."""
        return self.issue_client(cn, lifetime, check_request(csr, cn))[1]

    def issue_crl(
        self, revoked: Iterable[tuple[int, dt.datetime]], lifetime: dt.timedelta,
    ) -> x509.CertificateRevocationList:
        now = utcnow()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + lifetime)
        )
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self.key, hashes.SHA256())


def check_request(csr: x509.CertificateSigningRequest, cn: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public key of a device's CSR for identity `cn`, if it may be signed: self-signed, naming
    `cn` alone, a key type the fleet accepts, and not asking to be a CA. Raises CsrRefused saying why not."""
    if not csr.is_signature_valid:
        raise CsrRefused("bad_request", "the certificate request's signature is invalid: make a new request")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != cn:
        found = names[0].value if names else "no CN"
        raise CsrRefused(
            "wrong_subject",
            f"the certificate request names {found!r} but the device is {cn!r}: "
            f"make the request with CN={cn}"
        )
    try:
        constraints = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError as exc:
        raise CsrRefused("bad_request", f"the certificate request's extensions are malformed ({exc})") from None
    if constraints is not None and constraints.ca:
        raise CsrRefused("ca_request", "the certificate request asks to be a CA (CA:TRUE): devices get end-entity "
                                       "certificates only; make the request without basicConstraints")
    public_key = csr.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise CsrRefused("bad_request", f"curve {public_key.curve.name} is not accepted: use P-256 or P-384")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise CsrRefused("bad_request", f"RSA {public_key.key_size} is too weak: use P-256 or RSA ≥ 2048")
    else:
        raise CsrRefused("bad_request", "only ECDSA (P-256, P-384) and RSA keys are accepted")
    return public_key


def host_names(cert: x509.Certificate) -> list[str]:
    """The CN, then every SAN entry (names and addresses): what a renewed server certificate names again."""
    hosts = [common_name(cert)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return hosts
    hosts += san.get_values_for_type(x509.DNSName)
    hosts += [str(address) for address in san.get_values_for_type(x509.IPAddress)]
    return list(dict.fromkeys(h for h in hosts if h))


def renewal_due_in(expires: dt.datetime, lifetime: dt.timedelta, fraction: float, now: dt.datetime) -> float:
    """Seconds until less than `fraction` of `lifetime` is left before `expires` (<= 0: due now)."""
    return ((expires - now) - lifetime * fraction).total_seconds()


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode()


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def read_key_file(path: Path, what: str) -> bytes:
    """The bytes of one of the hub's PKI files; UsageError naming the file and the fix when it cannot be read."""
    try:
        return path.read_bytes()
    except PermissionError:
        raise UsageError(f"cannot read {what}: {permission_advice(path)}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}; restore it from the hub's backup") from None


def load_policy_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The hub's policy-signing key (never the CA key); UsageError says what is wrong."""
    try:
        key = serialization.load_pem_private_key(read_key_file(path, "the policy-signing key"), password=None)
    except ValueError:
        raise UsageError(f"{path} is not a PEM private key: restore it from the hub's backup") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 key; policies are signed with Ed25519")
    return key
