"""The duration grammar policies and settings share: a number and a unit (500ms, 30s, 5m, 1h)."""

from __future__ import annotations

import re
from typing import Final

DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_DURATION: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """'500ms', '30s', '5m', '1h' → seconds; ValueError says what is accepted."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration: use a number and a unit, e.g. 500ms, 30s, 5m or 1h")
    return float(match[1]) * DURATION_UNITS[match[2]]
