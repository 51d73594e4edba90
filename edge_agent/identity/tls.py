"""The device's TLS identity on disk: which certificate and key the next connection uses.

Three places can hold a certificate with its key (docs/security.md, "Certificate lifecycle"):

- the bundle's files, `tls.cert` and `tls.key` in agent.toml, as provisioned;
- `STATE/identity.pem`, the latest certificate renewed in band, with its key, in one file:
  replacing the pair is one rename, so no crash can leave a certificate beside a key that
  is not its own (the bundle's folder, /etc/edge-agent, is read-only to the daemon anyway);
- `STATE/identity.next.pem`, a renewal in progress: the new key made on the device and,
  once the hub has signed its request, the certificate too ("pending").

The current identity is the usable pair (the key belongs to the certificate) whose
certificate expires last: a bundle re-provisioned by hand after the device's certificate
expired offline wins over the expired renewed one, and a renewed one over the bundle's.
A pending pair is tried on the next connection and promoted (renamed over identity.pem) once
it has connected. Every write is atomic, so a kill -9 at any step leaves the current pair as
it was or the new one in its place. Nothing here imports `cryptography` (certinfo, ssl).
"""

from __future__ import annotations

import os
import re
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from edge_agent.identity.certinfo import CertificateInfo, CertificateUnreadable, read_certificate, read_certificate_file
from edgefleet.errors import IdentityError
from edgefleet.mqtt.session import TlsIdentity
from edgefleet.runtime.files import sync_directory, write_atomic

RENEWED: Final = "identity.pem"
NEXT: Final = "identity.next.pem"
_PEM_KEY: Final = re.compile(rb"-----BEGIN (EC |RSA )?PRIVATE KEY-----.+?-----END \1?PRIVATE KEY-----\n?", re.S)

Source = Literal["bundle", "renewed", "pending"]


@dataclass(frozen=True)
class Credential:
    """A certificate with its key, where it came from, and what the certificate says."""

    source: Source
    tls: TlsIdentity
    cert: CertificateInfo

    def describe(self) -> str:
        return f"serial {self.cert.serial:x}, valid until {self.cert.not_after:%Y-%m-%d %H:%M:%S} UTC"


class IdentityFiles:
    def __init__(self, bundle: TlsIdentity, state_dir: Path) -> None:
        self.bundle = bundle
        self.renewed_path = state_dir / RENEWED
        self.next_path = state_dir / NEXT
        # What each source's files said, by their inode, mtime and size: every connection attempt
        # asks, and a check (parsing, and ssl loading the CA and the pair) is not free for a fleet
        # of agents in one process. Every write replaces a file, so a change is always seen.
        self._checked: dict[Source, tuple[object, Credential | str]] = {}  # a credential, or what is wrong

    def _pair(self, path: Path) -> TlsIdentity:
        return TlsIdentity(self.bundle.ca, path, path)

    def load(self, source: Source) -> Credential:
        """One of the three, checked: raise IdentityError with what is wrong with it."""
        tls = self.bundle if source == "bundle" else self._pair(
            self.renewed_path if source == "renewed" else self.next_path)
        files = str(tls.cert) if tls.key == tls.cert else f"{tls.cert} with {tls.key}"
        try:
            stamp = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in map(os.stat, (tls.ca, tls.cert, tls.key)))
        except OSError as exc:
            raise IdentityError(f"{files}: {exc}") from None
        seen = self._checked.get(source)
        if seen is None or seen[0] != stamp:
            seen = self._checked[source] = (stamp, self._check(source, tls, files))
        if isinstance(seen[1], str):
            raise IdentityError(seen[1])
        return seen[1]

    @staticmethod
    def _check(source: Source, tls: TlsIdentity, files: str) -> Credential | str:
        try:
            cert = read_certificate_file(tls.cert)
            tls.context()  # ssl checks that the key belongs to the certificate (KEY_VALUES_MISMATCH)
        except (OSError, CertificateUnreadable, ssl.SSLError) as exc:
            return f"{files}: {exc}"
        return Credential(source, tls, cert)

    def _usable(self, source: Source) -> Credential | None:
        try:
            return self.load(source)
        except IdentityError:
            return None

    def current(self) -> Credential | None:
        """The usable pair that expires last (renewed or bundle), or None when neither is usable."""
        found = [c for c in (self._usable("renewed"), self._usable("bundle")) if c is not None]
        return max(found, key=lambda c: c.cert.not_after, default=None)

    def in_use(self) -> TlsIdentity:
        """The pair a connection would use now (`edge-agent check`): the current one, or the
        bundle's when none is usable, so that what is wrong with it can be said."""
        current = self.current()
        return self.bundle if current is None else current.tls

    def pending(self) -> Credential | None:
        """The renewed pair waiting to be tried; None also while the next key has no certificate yet."""
        return self._usable("pending")

    def has_next_key(self) -> bool:
        return self.next_path.exists()

    def store_pending(self, cert_pem: bytes) -> Credential:
        """Put the hub's certificate beside the next key, in one atomic write, once it is
        known to fit the key; raise IdentityError (and change nothing) otherwise."""
        self._store_pair(cert_pem, self.next_path, self.next_path, "the renewal's key")
        return self.load("pending")

    def store_enrolled(self, cert_pem: bytes, key_path: Path) -> Credential:
        """The certificate an enrollment got, with the key made for it (at `key_path`), becomes the
        current identity in one atomic write; IdentityError (and nothing changed) if they do not fit."""
        self._store_pair(cert_pem, key_path, self.renewed_path, "the enrollment's key")
        return self.load("renewed")

    def _store_pair(self, cert_pem: bytes, key_path: Path, target: Path, what: str) -> None:
        try:
            key = _PEM_KEY.search(key_path.read_bytes())
        except OSError as exc:
            raise IdentityError(f"{what} {key_path} is gone ({exc.strerror})") from None
        if key is None:
            raise IdentityError(f"{key_path} holds no private key")
        combined = cert_pem.rstrip(b"\n") + b"\n" + key.group(0)
        try:
            read_certificate(combined)
        except CertificateUnreadable as exc:
            raise IdentityError(f"the hub's certificate is unreadable: {exc}") from None
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".identity.check.") as scratch:
            os.fchmod(scratch.fileno(), 0o600)
            scratch.write(combined)
            scratch.flush()
            try:
                self._pair(Path(scratch.name)).context()
            except ssl.SSLError as exc:
                raise IdentityError(f"the hub's certificate does not belong to the key made for it ({exc})") from None
        write_atomic(target, combined, 0o600)

    def promote(self) -> Credential:
        """The pending pair becomes the renewed one: one rename, made durable."""
        os.replace(self.next_path, self.renewed_path)
        sync_directory(self.renewed_path.parent)
        return self.load("renewed")

    def refusals(self, device: str) -> list[str]:
        """Why an agent for `device` must not start on these files, in the sentences of `edge-agent check`:
        a certificate for another device (the broker would refuse every publish and, with its client id
        forced to the CN, kick the real device off), or a key others can read."""
        credential = self.current() or self.pending()
        if credential is None:
            try:
                self.load("bundle")
            except IdentityError as exc:
                return [f"cannot load the TLS identity ({exc}); `edge-agent check` says what is wrong with it."]
            return []  # loaded since current() looked: nothing to refuse
        problems = [p for p in (wrong_device(credential.cert.common_name, device),) if p]
        private, sentence = key_permissions(credential.tls.key)
        return problems if private else [*problems, sentence]

    def discard_next(self) -> None:
        """Drop the renewal in progress, key and all: the next one starts from a new key."""
        self.next_path.unlink(missing_ok=True)
        sync_directory(self.next_path.parent)



def wrong_device(common_name: str, device: str) -> str | None:
    """The sentence for a certificate that is not `device`'s, or None when it is."""
    if common_name == device:
        return None
    return f"the certificate is for {common_name!r} but device_id is {device!r}: use this device's own bundle."


def key_permissions(path: Path) -> tuple[bool, str]:
    """Whether the key file is private to the agent's user, and the sentence that says so or what to do."""
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return False, f"{path} is readable by other users (mode {mode:04o}): run `chmod 600 {path}`."
    if st.st_uid not in (os.geteuid(), 0):
        return False, f"{path} belongs to uid {st.st_uid}, not to the agent's user: chown it."
    return True, f"{path} is private (mode {mode:04o})."
