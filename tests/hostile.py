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
