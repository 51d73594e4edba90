"""Opening the signing envelope: the agent's half, with PyNaCl (the hub seals with
`cryptography`, hub/rollout/signing.py; the format is edgefleet/wire/envelope.py)."""

from __future__ import annotations

from edgefleet.wire.envelope import SignedEnvelope, key_id, signed_bytes
from edgefleet.wire.protocol import ProtocolError


def open_envelope(envelope: SignedEnvelope, trusted: bytes) -> bytes:
    """Return the payload if the raw Ed25519 key `trusted` signed it, else raise ProtocolError('bad_signature').

    PyNaCl is imported here, not at module import: only a policy from the hub needs it (the
    agent's memory budget).
    """
    from nacl.exceptions import BadSignatureError, CryptoError
    from nacl.signing import VerifyKey

    if envelope.key_id != key_id(trusted):
        raise ProtocolError("bad_signature", f"signed by unknown key {envelope.key_id}")
    try:
        VerifyKey(trusted).verify(signed_bytes(envelope.payload), envelope.signature)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        raise ProtocolError("bad_signature", "signature does not match the payload") from None
    return envelope.payload
