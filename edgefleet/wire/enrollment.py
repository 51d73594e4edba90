"""Zero-touch enrollment over HTTPS: the request a device sends with its bootstrap credential,
the hub's answer, and the credential's format. Both sides import this; nothing here does I/O.

The credential is `efe1.<id>.<secret>`: the id names the enrollment (public, in logs and rate
limits), the secret proves the holder was given the image (the hub keeps only its SHA-256).
"""

from __future__ import annotations

import re
from typing import Final, Literal

import msgspec

ENROLL_PATH: Final = "/enroll"
TOKEN_PREFIX: Final = "efe1"  # noqa: S105  # the format's name, not a secret
TOKEN_PATTERN: Final = re.compile(r"efe1\.([0-9a-f]{12})\.([A-Za-z0-9_-]{43})")
MAX_REQUEST_BYTES: Final = 16 * 1024  # a P-384 CSR in PEM is under 1 KB; RSA 4096 under 2 KB

Outcome = Literal["issued", "pending", "refused"]


class EnrollRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device: str  # the id the device takes; the CSR's CN must be the same
    csr: str  # PEM PKCS#10, made on the device for a key that never leaves it


class EnrollReply(msgspec.Struct, frozen=True, omit_defaults=True):
    outcome: Outcome
    reason: str = ""  # a short name (refused, pending): forged, expired, revoked, exhausted, ...
    detail: str = ""  # one sentence for the device's log and `edge-agent status`
    cert: str = ""  # PEM, when issued
    retry_after: float = 0.0  # seconds: when to ask again (pending, rate limited, busy)


def parse_token(text: str) -> tuple[str, str] | None:
    """(enrollment id, secret) of a well-formed credential, else None."""
    match = TOKEN_PATTERN.fullmatch(text.strip())
    return (match[1], match[2]) if match else None
