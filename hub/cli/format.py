"""How the listing commands and `edge-hub status` read times, and show times and events on one line."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from edgefleet.wire.events import EventKind

MOMENT_HELP: Final = ("an ISO 8601 time (2026-11-21T16:00:00Z; UTC unless it says otherwise), seconds since "
                      "the epoch, or an age like 90s, 15m, 2h, 7d (that long before now)")


def moment(text: str) -> float:
    """A time the listing commands take (MOMENT_HELP) as epoch seconds; argparse's error otherwise."""
    import argparse
    import datetime as dt
    import time

    from edgefleet.runtime.durations import parse_duration

    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        instant = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601, epoch seconds, or an age like 15m"
        ) from None
    return (instant if instant.tzinfo else instant.replace(tzinfo=dt.UTC)).timestamp()


def when(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def event_detail(kind: str, body: dict[str, Any], width: int = 100) -> str:
    """One short line for a human: the fields that matter for the kind, else the body itself."""
    def short(value: object) -> str:
        return value if isinstance(value, str) else msgspec.json.encode(value).decode()

    parts: list[str] = []
    if body.keys() == {"unreadable", "text"}:  # as protocol.json_body marks a body it cannot read
        parts = [f"unreadable body ({short(body['unreadable'])}):", short(body["text"])]
    elif kind == EventKind.RULE_FIRED and isinstance(body.get("readings"), dict):
        parts = [f"{k}={short(v)}" for k, v in body["readings"].items()]
    elif kind.startswith("action_"):
        parts = [short(body.get("action", "?"))]
        if kind == EventKind.ACTION_STARTED and body.get("args"):
            parts.append(short(body["args"]))
        if body.get("timed_out"):
            parts.append("timed out")
        elif body.get("exit_code") is not None:
            parts.append(f"exit {body['exit_code']}")
        if body.get("latency_ms") is not None:
            parts.append(f"{body['latency_ms']} ms")
        if body.get("detail"):
            parts.append(short(body["detail"]))
    elif kind == EventKind.ESCALATION:
        parts = [short(body.get("reason", "?")) + ":", short(body.get("detail", ""))]
    elif kind == EventKind.ALERT:
        parts = [short(body.get("severity", "?")) + ":", short(body.get("message", ""))]
    elif kind == EventKind.OUTBOX_CORRUPT:
        parts = [short(body.get("reason", "?")), f"moved to {short(body.get('moved_to', '?'))}"]
    elif body:
        parts = [short(body)]
    text = " ".join(p for p in parts if p).replace("\n", " ").replace("\t", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
