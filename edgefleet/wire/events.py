"""The audit event vocabulary: the kinds of event a device records in its outbox and the hub
stores, named once for both sides. A member is its string (`StrEnum`), so it is stored, sent and
compared exactly as the literal it replaces."""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class EventKind(StrEnum):
    """What happened; the event's body says the details (docs/rules.md, docs/protocol.md)."""

    # the rule engine (edge_agent.decide.rules)
    RULE_FIRED = "rule_fired"
    RULE_CLEARED = "rule_cleared"
    ACTION_STARTED = "action_started"
    ACTION_SUCCEEDED = "action_succeeded"
    ACTION_FAILED = "action_failed"
    ACTION_REFUSED = "action_refused"
    ACTION_SKIPPED = "action_skipped"
    COORDINATION_SKIPPED = "coordination_skipped"
    ESCALATION = "escalation"
    ALERT = "alert"
    # the agent
    OUTBOX_CORRUPT = "outbox_corrupt"
    POLICY_APPLIED = "policy_applied"
    POLICY_REFUSED = "policy_refused"
    TASK_REFUSED = "task_refused"
    TASK_STARTED = "task_started"
    TASK_DONE = "task_done"
    CLOCK_CORRECTED = "clock_corrected"
    CLOCK_UNKNOWN = "clock_unknown"
    CERT_RENEWED = "cert_renewed"
    CERT_FALLBACK = "cert_fallback"
    CERT_CLOCK_SKEW = "cert_clock_skew"
    # field sensors (edge_agent.sense.field): state changes only, never one per failed poll
    SENSOR_FAILING = "sensor_failing"
    SENSOR_RECOVERED = "sensor_recovered"
    # the hub
    ROLLOUT_STARTED = "rollout_started"
    ROLLOUT_WAVE = "rollout_wave"
    ROLLOUT_COMPLETE = "rollout_complete"
    ROLLOUT_PROMOTED = "rollout_promoted"
    ROLLOUT_ROLLED_BACK = "rollout_rolled_back"
    ROLLOUT_ABORTED = "rollout_aborted"
    CERT_ISSUED = "cert_issued"
    CERT_REFUSED = "cert_refused"
    LEASE_EXPIRED = "lease_expired"
    APPROVAL_EXPIRED = "approval_expired"
    APPROVAL_APPROVED = "approval_approved"
    APPROVAL_DENIED = "approval_denied"
    TASK_OFFERED = "task_offered"
    TASK_FAILED = "task_failed"  # (a task the hub closes as done is TASK_DONE, the device's own kind)
    FOREIGN_SUBSCRIPTION = "foreign_subscription"
    IDENTITY_CONFLICT = "identity_conflict"
    # zero-touch enrollment (hub.pki.enroll): every enrollment, refusal and hold is audited
    ENROLLMENT_CREATED = "enrollment_created"
    ENROLLMENT_REVOKED = "enrollment_revoked"
    ENROLLED = "enrolled"
    ENROLL_PENDING = "enroll_pending"
    ENROLL_REFUSED = "enroll_refused"
    ENROLL_READMITTED = "enroll_readmitted"


# What a rule's action ended as: counted by the engine and by the hub's metrics.
ACTION_OUTCOMES: Final = (EventKind.ACTION_SUCCEEDED, EventKind.ACTION_FAILED, EventKind.ACTION_REFUSED,
                          EventKind.ACTION_SKIPPED)

# The kind of event a state change is recorded as, by the state it ends in; an unknown state is
# a KeyError, never a new kind.
ROLLOUT_REVERTED: Final = {"rolled_back": EventKind.ROLLOUT_ROLLED_BACK, "aborted": EventKind.ROLLOUT_ABORTED}
TASK_FINISHED: Final = {"done": EventKind.TASK_DONE, "failed": EventKind.TASK_FAILED}
APPROVAL_DECIDED: Final = {"approved": EventKind.APPROVAL_APPROVED, "denied": EventKind.APPROVAL_DENIED}
