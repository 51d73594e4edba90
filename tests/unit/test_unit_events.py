"""Every event kind the code can emit is an EventKind: no kind is spelled, or formatted, outside
edgefleet/wire/events.py."""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.buffer.outbox import Outbox
from edge_agent.decide.rules import RuleEngine
from edge_agent.identity.renewal import Audit
from edgefleet.wire.events import APPROVAL_DECIDED, ROLLOUT_REVERTED, TASK_FINISHED, EventKind
from hub.db.identities import EventSink
from hub.db.store import HubStore
from hub.rollout.rollouts import FINISHED

ROOT = Path(__file__).resolve().parents[2]
KINDS = {kind.value for kind in EventKind}
# The same spelling, but not an event kind: the `alert` action, the `task_done` message tag,
# the devices table's `policy_refused` column.
NOT_KINDS = {
    ("edge_agent/decide/actuators.py", "alert"), ("edgefleet/policy/document.py", "alert"),
    ("edgefleet/policy/profiles.py", "alert"), ("edgefleet/wire/protocol.py", "task_done"),
    ("hub/db/rows.py", "policy_refused"), ("hub/cli/export.py", "clock_unknown"),  # a CSV column
    # An enrollment's states and the status report's keys, not events:
    ("edge_agent/identity/enroll.py", "enrolled"), ("edge_agent/ops/status.py", "enrolled"),
    ("hub/cli/status.py", "enroll_refused"),
}
EMITTERS: list[tuple[Callable[..., Any], str]] = [
    (Outbox.add_event, "kind"), (HubStore.hub_event, "kind"), (RuleEngine._audit, "kind"), (Agent._record, "kind"),
]


def sources() -> list[Path]:
    return [p for package in ("edgefleet", "edge_agent", "hub") for p in sorted((ROOT / package).rglob("*.py"))
            if p != ROOT / "edgefleet" / "wire" / "events.py"]


def test_no_kind_is_a_string_literal_outside_events_py() -> None:
    spelled = []
    for path in sources():
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in KINDS and (where, node.value) not in NOT_KINDS:
                spelled.append(f"{where}:{node.lineno}: {node.value!r}")
    assert spelled == []


def test_no_kind_is_quoted_in_sql_outside_events_py() -> None:
    """`WHERE kind = 'escalation'`: the kind is a bound parameter (an EventKind) instead."""
    quoted = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                quoted += [f"{path.relative_to(ROOT)}:{node.lineno}: {kind}"
                           for kind in KINDS if f"'{kind}'" in node.value]
    assert quoted == []


def test_no_kind_is_formatted_from_a_state() -> None:
    """f"rollout_{state}" and the like: the kinds they make are not known to the vocabulary."""
    prefixes = {kind.split("_")[0] + "_" for kind in KINDS if "_" in kind}
    formatted = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(first := node.values[0], ast.Constant) \
                    and first.value in prefixes and len(node.values) > 1:
                formatted.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert formatted == []


@pytest.mark.parametrize(("emit", "parameter"), EMITTERS, ids=lambda e: getattr(e, "__qualname__", str(e)))
def test_what_records_an_event_takes_an_event_kind(emit: Callable[..., Any], parameter: str) -> None:
    """mypy (strict, in the lint step) then refuses any caller that passes a plain string."""
    assert typing.get_type_hints(emit)[parameter] is EventKind, inspect.signature(emit)


def test_the_event_sinks_take_an_event_kind() -> None:
    assert typing.get_args(Audit)[0][0] is EventKind
    assert typing.get_args(EventSink)[0][0] is EventKind


def test_every_state_change_maps_to_a_kind() -> None:
    assert set(ROLLOUT_REVERTED) == set(FINISHED) - {"complete"}  # completion has its own kind
    assert set(TASK_FINISHED) == {"done", "failed"}
    assert set(APPROVAL_DECIDED) == {"approved", "denied"}
    for mapping in (ROLLOUT_REVERTED, TASK_FINISHED, APPROVAL_DECIDED):
        assert all(isinstance(kind, EventKind) for kind in mapping.values())
    # The stored strings are what they were when these kinds were formatted from the state.
    assert [ROLLOUT_REVERTED[s] for s in ("rolled_back", "aborted")] == ["rollout_rolled_back", "rollout_aborted"]
    assert [TASK_FINISHED[s] for s in ("done", "failed")] == ["task_done", "task_failed"]
    assert [APPROVAL_DECIDED[s] for s in ("approved", "denied")] == ["approval_approved", "approval_denied"]
