"""How device and hub name a public key: envelope.key_id of its DER SubjectPublicKeyInfo.
`cryptography` is imported only when a key is named (the agent does that in its key helper)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefleet.wire.envelope import key_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes


def public_key_id(public_key: PublicKeyTypes) -> str:
    """envelope.key_id of the key's DER SubjectPublicKeyInfo: how the device (here) and the hub
    (hub.pki.renewal, for the request it signs) name a renewal's key."""
    from cryptography.hazmat.primitives import serialization

    return key_id(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
