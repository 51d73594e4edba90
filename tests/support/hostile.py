"""Payloads nested deeper than a recursive decoder can follow, a few KB each."""

from __future__ import annotations

import json
from typing import Any

import msgspec

DEEP = 5000  # far beyond the interpreter's recursion limit (1000)
BODY = "[" * DEEP + "]" * DEEP  # 10,000 characters of JSON: under the 16 KiB event body limit


def nested_msgpack(fields: dict[str, Any], depth: int = DEEP) -> bytes:
    """A msgpack map of `fields` plus an unknown field holding arrays nested `depth` deep."""
    head = msgspec.msgpack.encode(fields)
    assert 0x80 <= head[0] < 0x8F  # a fixmap: one more entry is one more in the count
    return bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("zz") + b"\x91" * depth + b"\xc0"


def nested_json(fields: dict[str, Any], depth: int = DEEP) -> bytes:
    """A JSON object of `fields` plus an unknown field holding arrays nested `depth` deep."""
    return json.dumps(fields).encode()[:-1] + b', "zz": ' + b"[" * depth + b"]" * depth + b"}"


def csr_of_unknown_key_type(cn: str) -> str:
    """A PEM certificate request for `cn` whose key algorithm OID no library knows (1.2.840.10045.2.9)."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256()))
    der = csr.public_bytes(serialization.Encoding.DER)
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")
    assert der.count(ec_public_key) == 1
    body = base64.encodebytes(der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209"))).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
