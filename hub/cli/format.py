"""How the listing commands and `edge-hub status` show times and events on one line."""

from __future__ import annotations

from typing import Any

import msgspec

from edgefleet.wire.events import EventKind


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
