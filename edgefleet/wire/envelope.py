"""The signing envelope's format, which both sides share: the struct on the wire, the bytes a
signature covers, and how a public key is read and named.

Only the format lives here. Sealing is the hub's (hub/rollout/signing.py, with `cryptography`);
opening is the agent's (edge_agent/decide/verify.py, with PyNaCl). Neither side carries the
other's code path or its library, and this module imports neither (an import contract says so).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

import msgspec

from edgefleet.wire.protocol import ProtocolError

# Domain separation: a signature over a policy can never be replayed as another kind.
SIGNING_CONTEXT: Final = b"edgefleet-envelope-v1\x00"
# The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): a public key file is these
# 12 bytes and the 32-byte key, whoever wrote it.
_ED25519_SPKI_PREFIX: Final = bytes.fromhex("302a300506032b6570032100")
ED25519_KEY_BYTES: Final = 32


class SignedEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """A payload with an Ed25519 signature by the hub's policy key (never the CA key)."""

    key_id: str
    payload: bytes
    signature: bytes


def signed_bytes(payload: bytes) -> bytes:
    """What the signature covers: the context, then the payload."""
    return SIGNING_CONTEXT + payload


def ed25519_public_from_pem(data: bytes) -> bytes:
    """The raw 32-byte key of a PEM Ed25519 public key; raise ProtocolError('bad_key') if it is not one."""
    text = data.decode("ascii", "replace").strip()
    header, footer = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    if not (text.startswith(header) and text.endswith(footer)):
        raise ProtocolError("bad_key", "not a PEM public key")
    try:
        der = base64.b64decode("".join(text[len(header):-len(footer)].split()), validate=True)
    except ValueError:
        raise ProtocolError("bad_key", "the PEM body is not base64") from None
    if len(der) != len(_ED25519_SPKI_PREFIX) + ED25519_KEY_BYTES or not der.startswith(_ED25519_SPKI_PREFIX):
        raise ProtocolError("bad_key", "not an Ed25519 public key")
    return der[len(_ED25519_SPKI_PREFIX):]


def key_id(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()[:16]
