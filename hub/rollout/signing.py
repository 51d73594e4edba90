"""Sealing a payload in the signing envelope: the hub's half, with `cryptography` (the agent
opens it with PyNaCl, edge_agent/decide/verify.py; the format is edgefleet/wire/envelope.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefleet.wire.envelope import SignedEnvelope, key_id, signed_bytes

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def seal(payload: bytes, signing_key: Ed25519PrivateKey) -> SignedEnvelope:
    """Sign `payload` with the hub's policy key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return SignedEnvelope(key_id=key_id(raw), payload=payload, signature=signing_key.sign(signed_bytes(payload)))
