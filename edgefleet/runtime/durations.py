"""The one duration grammar: a number and a unit, written together (500ms, 30s, 5m, 1h, 7d).

Every duration anyone types goes through here: a policy's cooldowns, windows and timeouts, the
CLIs' durations (--bake, --deadline, --timeout, --duration, --every) and ages (--since 15m). A
policy takes the units up to hours (its longest span, a rate window, is written `168h`); the
command line takes days too. Where a bare number is accepted (a TOML number, a command-line
option), it is seconds. docs/rules.md, "Durations", is the user's side of this.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
POLICY_UNITS: Final = ("ms", "s", "m", "h")  # a policy writes days as hours (docs/rules.md)
NUMBER: Final = r"[0-9]+(?:\.[0-9]+)?"

_DURATION: Final = re.compile(rf"({NUMBER})([A-Za-z]+)")
_EXAMPLES: Final = {"ms": "500ms", "s": "30s", "m": "5m", "h": "1h", "d": "7d"}


def parse_duration(text: str, units: Sequence[str] = tuple(DURATION_UNITS), *, bare_seconds: bool = False) -> float:
    """'500ms', '30s', '5m', '1h', '7d' → seconds, in `units` only; with `bare_seconds` a plain
    number is seconds too. ValueError says in one sentence what is accepted."""
    if bare_seconds:
        try:
            return float(text)
        except ValueError:
            pass
    match = _DURATION.fullmatch(text.strip())
    if not match or match[2] not in units:
        raise ValueError(f"{text!r} is not a duration: use a number and a unit, e.g. "
                         f"{_listed([_EXAMPLES[unit] for unit in units])}")
    return float(match[1]) * DURATION_UNITS[match[2]]


def unit_names(units: Sequence[str]) -> str:
    """'ms, s, m or h': the units, as an error message lists them."""
    return _listed(list(units))


def _listed(items: list[str]) -> str:
    return f"{', '.join(items[:-1])} or {items[-1]}" if len(items) > 1 else items[0]
