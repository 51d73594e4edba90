"""A certificate's serial number, subject CN and validity dates, read without `cryptography`.

The daemon never imports `cryptography` (8-15 MB of RSS it would keep, docs/performance.md
P3). What it needs to know about its own certificate, to renew it in time, is read here with
a DER reader that understands just the fields of an X.509 TBSCertificate it looks at.
Whether a key belongs to a certificate is left to `ssl` (TlsIdentity.context()).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_PEM_CERTIFICATE: Final = re.compile(rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")
_SEQUENCE, _INTEGER, _OID, _UTC_TIME, _GENERALIZED_TIME = 0x30, 0x02, 0x06, 0x17, 0x18
_VERSION: Final = 0xA0  # [0] EXPLICIT, the optional first field of a TBSCertificate
_COMMON_NAME: Final = bytes.fromhex("550403")  # OID 2.5.4.3
_STRINGS: Final = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be"}


class CertificateUnreadable(ValueError):
    """Not a PEM X.509 certificate this reader understands; the message says what was wrong."""


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    serial: int
    common_name: str
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def point(self, share: float) -> dt.datetime:
        """When `share` of the certificate's life has passed."""
        return self.not_before + self.lifetime * share

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.not_after


def read_certificate(pem: bytes) -> CertificateInfo:
    """The first certificate of a PEM text (which may also hold a key or more certificates)."""
    match = _PEM_CERTIFICATE.search(pem)
    if match is None:
        raise CertificateUnreadable("no PEM certificate in it")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except binascii.Error:
        raise CertificateUnreadable("its PEM body is not base64") from None
    try:
        return _parse(der)
    except (IndexError, ValueError) as exc:
        raise CertificateUnreadable(f"not an X.509 certificate ({exc})") from None


def read_certificate_file(path: Path) -> CertificateInfo:
    """Raises OSError if the file cannot be read, CertificateUnreadable if it is not a certificate."""
    return read_certificate(path.read_bytes())


def _parse(der: bytes) -> CertificateInfo:
    certificate = _children(_expect(der, 0, _SEQUENCE))
    fields = _children(_expect(der, certificate[0], _SEQUENCE))  # the TBSCertificate
    if der[fields[0]] == _VERSION:
        fields = fields[1:]
    serial = int.from_bytes(_value(_expect(der, fields[0], _INTEGER)), "big", signed=True)
    validity = _children(_expect(der, fields[3], _SEQUENCE))
    return CertificateInfo(serial=serial, common_name=_common_name(der, fields[4]),
                           not_before=_time(der, validity[0]), not_after=_time(der, validity[1]))


def _header(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the element at `pos`."""
    tag, length = der[pos], der[pos + 1]
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError(f"length of {count} bytes")
        length = int.from_bytes(der[start:start + count], "big")
        start += count
    end = start + length
    if end > len(der):
        raise ValueError("truncated")
    return tag, start, end


def _expect(der: bytes, pos: int, tag: int) -> tuple[bytes, int, int]:
    found, start, end = _header(der, pos)
    if found != tag:
        raise ValueError(f"tag 0x{found:02x} where 0x{tag:02x} belongs")
    return der, start, end


def _value(element: tuple[bytes, int, int]) -> bytes:
    der, start, end = element
    return der[start:end]


def _children(element: tuple[bytes, int, int]) -> list[int]:
    """Where each element inside a constructed one begins."""
    der, pos, end = element
    found: list[int] = []
    while pos < end:
        found.append(pos)
        pos = _header(der, pos)[2]
    return found


def _time(der: bytes, pos: int) -> dt.datetime:
    tag, start, end = _header(der, pos)
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME and len(text) == 13 and text.endswith("Z"):
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"  # RFC 5280: 50-99 are 19xx
    elif not (tag == _GENERALIZED_TIME and len(text) == 15 and text.endswith("Z")):
        raise ValueError(f"time {text!r} is not in the form RFC 5280 requires")
    return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)


def _common_name(der: bytes, pos: int) -> str:
    """The subject's first CN ("" without one)."""
    for rdn in _children(_expect(der, pos, _SEQUENCE)):
        for attribute in _children(_header_element(der, rdn)):
            oid, value = _children(_expect(der, attribute, _SEQUENCE))[:2]
            if _value(_expect(der, oid, _OID)) == _COMMON_NAME:
                tag, start, end = _header(der, value)
                return der[start:end].decode(_STRINGS.get(tag, "utf-8"), "replace")
    return ""


def _header_element(der: bytes, pos: int) -> tuple[bytes, int, int]:
    _, start, end = _header(der, pos)
    return der, start, end
