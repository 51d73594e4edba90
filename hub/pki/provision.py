"""`edge-hub provision`: one relocatable bundle per device, registered in the hub database."""

from __future__ import annotations

import csv
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes as PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edgefleet.errors import ConfigError
from edgefleet.policy.profiles import find_profile, load_profile
from edgefleet.runtime.files import write_atomic
from edgefleet.runtime.settings import toml_value
from edgefleet.wire.protocol import ProtocolError, validate_name
from hub.config import HubConfig, HubPaths
from hub.db.interface import HubState
from hub.errors import UsageError
from hub.pki.authority import Authority, cert_pem, common_name, key_pem, utcnow

# A bundle's certificate is kept on a re-run unless it has less than this left.
RENEW_BEFORE: Final = dt.timedelta(days=7)

log = logging.getLogger("hub.provision")


@dataclass(frozen=True)
class DeviceSpec:
    device: str
    profile: str
    tags: dict[str, str] = field(default_factory=dict)


def parse_tags(items: list[str], where: str = "--tag") -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{where} {item!r}: expected key=value")
        tags[key.strip()] = value.strip()
    return tags


def read_inventory(path: Path, default_profile: str) -> list[DeviceSpec]:
    """CSV columns: device id, profile (blank = default), tags as k=v separated by ';'."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read inventory {path}: {exc.strerror}") from None
    specs: list[DeviceSpec] = []
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not cells or not cells[0] or cells[0].startswith("#"):
            continue
        if number == 1 and cells[0].lower().replace(" ", "").replace("_", "") in ("device", "deviceid", "id"):
            continue  # a header row: "device id", "device_id", "device", "id"
        profile = cells[1] if len(cells) > 1 and cells[1] else default_profile
        raw_tags = [t for t in (cells[2].split(";") if len(cells) > 2 else []) if t.strip()]
        specs.append(DeviceSpec(cells[0], profile, parse_tags(raw_tags, f"{path}:{number}: tag")))
    if not specs:
        raise UsageError(f"inventory {path} lists no devices")
    return specs


def validate_specs(specs: list[DeviceSpec]) -> None:
    """Check every id and profile before touching anything, so a typo changes nothing."""
    seen: set[str] = set()
    for spec in specs:
        try:
            validate_name(spec.device)
        except ProtocolError as exc:
            raise UsageError(exc.detail) from None
        if spec.device in seen:
            raise UsageError(f"device {spec.device!r} is listed twice")
        seen.add(spec.device)
        try:
            find_profile(spec.profile)
        except ConfigError as exc:
            raise UsageError(f"device {spec.device}: {exc}") from None
    for profile in {s.profile for s in specs}:
        try:
            load_profile(profile)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None


def render_agent_toml(spec: DeviceSpec, config: HubConfig, has_key: bool) -> str:
    key_note = "" if has_key else "   # made on the device; this bundle never held it"
    tags = "\n".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in sorted(spec.tags.items()))
    return f"""\
# edgefleet agent configuration for {spec.device}, written by `edge-hub provision`.
# Paths are relative to this file's folder: copy the folder as a whole (to /etc/edge-agent/).
device_id = {toml_value(spec.device)}
profile = {toml_value(spec.profile)}
region = {toml_value(config.region)}
policy_key = "policy.pub"   # the hub's policy-signing key: only policies it signed are applied

[tags]
{tags}

[broker]
host = {toml_value(config.broker.host)}
port = {config.broker.port}
keepalive = 30

[tls]
ca = "ca.crt"
cert = "device.crt"
key = "device.key"{key_note}

[state]
dir = "state"   # the outbox; systemd/edge-agent.service points it at /var/lib/edge-agent
"""


@dataclass
class Provisioner:
    paths: HubPaths
    config: HubConfig
    store: HubState
    out: Path
    reissue: bool = False
    ca: Authority = field(init=False)

    def __post_init__(self) -> None:
        # Read at once: an unreadable CA key is said before any bundle folder exists.
        self.ca = Authority.load(self.paths.ca_key, self.paths.ca_cert)

    @property
    def lifetime(self) -> dt.timedelta:
        return dt.timedelta(days=self.config.pki.device_cert_days)

    async def provision(self, spec: DeviceSpec, csr: x509.CertificateSigningRequest | None = None) -> str:
        """Write or refresh one bundle; return what was done ('issued', 'kept', 'signed').

        A new certificate is recorded in the hub database before any file holds it, and each file
        is replaced atomically: whatever stops this half-way, every certificate on disk is one
        `edge-hub revoke` can put in the CRL, and a key and certificate that do not match are
        re-issued by the next run."""
        if await self.store.is_revoked(spec.device) and not self.reissue:
            raise UsageError(
                f"device {spec.device!r} is revoked; to admit it again with a new certificate, "
                "run provision with --reissue"
            )
        bundle = self.out / spec.device
        public_key = csr.public_key() if csr is not None else None
        key: ec.EllipticCurvePrivateKey | None = None
        if not self.reissue and await self._reusable(bundle, spec.device, public_key):
            cert = None
            action = "kept"
        elif csr is not None:
            cert = self.ca.sign_request(csr, spec.device, self.lifetime)
            action = "signed"
        else:
            key, cert = self.ca.issue_client(spec.device, self.lifetime)
            action = "issued"
        if cert is not None:
            await self.store.record_certificate(cert.serial_number, spec.device, "device", cert.not_valid_after_utc)
        bundle.mkdir(mode=0o700, parents=True, exist_ok=True)
        if key is not None:
            write_atomic(bundle / "device.key", key_pem(key), 0o600)
        elif csr is not None:
            (bundle / "device.key").unlink(missing_ok=True)
        if cert is not None:
            write_atomic(bundle / "device.crt", cert_pem(cert), 0o644)
        write_atomic(bundle / "ca.crt", self.paths.ca_cert.read_bytes(), 0o644)
        write_atomic(bundle / "policy.pub", self.paths.policy_pub.read_bytes(), 0o644)
        has_key = (bundle / "device.key").exists()
        write_atomic(bundle / "agent.toml", render_agent_toml(spec, self.config, has_key).encode(), 0o644)
        await self.store.register(spec.device, spec.profile, spec.tags, readmit=self.reissue)
        log.debug("bundle %s: %s", spec.device, action)
        return action

    async def _reusable(self, bundle: Path, device: str, public_key: PublicKey | None = None) -> bool:
        """Is the bundle's certificate from this CA, for this device, recorded by the hub and not
        revoked, fresh, and for `public_key` (a CSR's) or else for the bundle's own device.key?"""
        try:
            cert = x509.load_pem_x509_certificate((bundle / "device.crt").read_bytes())
            if public_key is None:
                key = load_pem_private_key((bundle / "device.key").read_bytes(), password=None)
                if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                    return False
                public_key = key.public_key()
        except (OSError, ValueError):
            return False
        if cert.issuer != self.ca.cert.subject or common_name(cert) != device:
            return False
        try:
            cert.verify_directly_issued_by(self.ca.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        vouched = await self.store.vouches_for(cert.serial_number, device)
        if vouched is None:
            # Ours but never recorded (an older edge-hub interrupted between writing and recording):
            # record it now, so that revoking the device locks out copies of it too, and replace it.
            log.warning("bundle %s holds certificate %x that the hub never recorded: recorded now and "
                        "replaced", device, cert.serial_number)
            await self.store.record_certificate(cert.serial_number, device, "device", cert.not_valid_after_utc)
            return False
        if not vouched or cert.public_key() != public_key:
            return False
        return cert.not_valid_after_utc - utcnow() >= RENEW_BEFORE


async def provision_all(
    provisioner: Provisioner, specs: list[DeviceSpec], advance: Callable[[str], None] = lambda _: None,
    stopped: Callable[[], bool] = lambda: False,
) -> dict[str, str]:
    """Provision `specs` in order; once `stopped()` says so, return what was finished (each
    device is finished or not begun, never half done)."""
    results: dict[str, str] = {}
    for spec in specs:
        if stopped():
            break
        results[spec.device] = await provisioner.provision(spec)
        advance(spec.device)
    return results


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError:
        try:
            return x509.load_der_x509_csr(data)
        except ValueError:
            raise UsageError(f"{path} is not a certificate request (PEM or DER)") from None
