"""The agent's side of signed policy distribution: verify, check, keep the last good one.

A policy from the hub changes nothing until all of this holds: the envelope is signed by
the hub's policy key (the bundle's policy.pub), the signed document names this device and
its profile, its version is higher than the one in force (no replays), and the policy
passes every check a local policy file gets (`check_policy`) and targets this device. Only
then is the signed envelope stored (atomically, so the last good policy survives a crash)
and handed back for the rule engine to switch to. Anything else is refused with a short
reason and a detail, which the agent reports to the hub; the policy in force stays.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from edge_agent.config import AgentSettings
from edge_agent.decide.verify import open_envelope
from edgefleet.policy.check import check_policy
from edgefleet.policy.document import Policy, PolicyError
from edgefleet.runtime.files import write_atomic
from edgefleet.wire.envelope import SignedEnvelope, ed25519_public_from_pem
from edgefleet.wire.protocol import MAX_REFUSAL_DETAIL, PolicyDocument, PolicyRefusal, ProtocolError, unpack

STORED_NAME: Final = "policy.signed"  # in the state directory: the envelope in force, as received

log = logging.getLogger(__name__)


class Refused(Exception):
    """A policy that must not be applied; `reason` is a short key the hub counts."""

    def __init__(self, version: int, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.refusal = PolicyRefusal(version=version, reason=reason, detail=detail[:MAX_REFUSAL_DETAIL],
                                     ts=time.time())


@dataclass(frozen=True)
class Outcome:
    kind: Literal["applied", "unchanged", "refused"]
    version: int
    policy: Policy | None = None  # applied: the rules to run now (None: none at all)
    refusal: PolicyRefusal | None = None
    withdrawn: bool = False  # applied: the hub withdrew its policies; the local file is back
    repeated: bool = False  # refused: the same refusal as last time (a resend), not news


class PolicyIntake:
    """Holds the signed version in force; `load()` once at start, then `offer()` each message."""

    def __init__(self, settings: AgentSettings, local: Policy | None) -> None:
        c = settings.config
        self.device, self.profile, self.region, self.tags = c.device_id, settings.profile, c.region, dict(c.tags)
        self.local = local
        self.stored = settings.state_dir / STORED_NAME
        self.key_path = settings.policy_key
        self.version = 0  # the signed version in force; 0: none (the local policy runs)
        # No version below this is ever applied: the stored one, even when it no longer passes
        # its checks here (a replayed older version must not get in through that gap).
        self.floor = 0
        self.refused: PolicyRefusal | None = None  # the latest refusal newer than what is in force

    def load(self) -> Policy | None:
        """The stored signed policy if it still checks out, else the local one."""
        try:
            data = self.stored.read_bytes()
        except FileNotFoundError:
            return self.local
        try:
            doc, policy = self._check(data)
        except Refused as exc:
            # Still the floor for replays when its signature was good: a stored v7 that this
            # profile no longer accepts must not let a replayed v5 in. Not in force, though.
            if exc.refusal.reason != "bad_signature":
                self.floor = max(self.floor, exc.refusal.version)
            self.refused = exc.refusal
            log.error("the stored policy %s is not usable (%s: %s); running the local policy instead",
                      self.stored, exc.refusal.reason, exc.refusal.detail)
            return self.local
        self.version = self.floor = doc.version
        return policy

    def offer(self, payload: bytes) -> Outcome:
        """Check a down/policy payload; on success it is stored and in force from now on."""
        try:
            doc, policy = self._check(payload)
            if doc.version == self.version:
                return Outcome("unchanged", doc.version)
            try:
                write_atomic(self.stored, payload, 0o600)
            except OSError as exc:
                raise Refused(doc.version, "store_failed", f"cannot keep it on disk: {exc}") from None
        except Refused as exc:
            repeated = self.refused is not None and (self.refused.version, self.refused.reason, self.refused.detail) \
                == (exc.refusal.version, exc.refusal.reason, exc.refusal.detail)
            self.refused = exc.refusal
            return Outcome("refused", exc.refusal.version, refusal=exc.refusal, repeated=repeated)
        self.version = self.floor = doc.version
        if self.refused is not None and self.refused.version <= doc.version:
            self.refused = None
        return Outcome("applied", doc.version, policy=policy, withdrawn=doc.text is None)

    def _check(self, payload: bytes) -> tuple[PolicyDocument, Policy | None]:
        try:
            trusted = ed25519_public_from_pem(self.key_path.read_bytes())
        except OSError as exc:
            raise Refused(_claimed_version(payload), "no_policy_key",
                          f"cannot read the hub's policy key {self.key_path}: {exc.strerror}; "
                          "re-run edge-hub provision for this device to get policy.pub") from None
        except ProtocolError as exc:
            raise Refused(_claimed_version(payload), "no_policy_key", f"{self.key_path}: {exc.detail}") from None
        try:
            envelope = unpack(payload, SignedEnvelope)
        except ProtocolError as exc:
            raise Refused(0, "malformed", f"not a signed envelope ({exc.detail})") from None
        try:
            signed = open_envelope(envelope, trusted)
        except ProtocolError as exc:
            raise Refused(0, "bad_signature", exc.detail) from None
        try:
            doc = unpack(signed, PolicyDocument)
        except ProtocolError as exc:
            raise Refused(0, "malformed", f"signed, but not a policy document ({exc.detail})") from None
        if doc.device != self.device:
            raise Refused(doc.version, "wrong_device", f"signed for device {doc.device!r}, this is {self.device!r}")
        if doc.profile != self.profile.name:
            raise Refused(doc.version, "wrong_profile",
                          f"signed for profile {doc.profile!r}, this device runs {self.profile.name!r}")
        if doc.region and self.region and doc.region != self.region:
            raise Refused(doc.version, "wrong_region", f"signed for region {doc.region!r}, this is {self.region!r}")
        if doc.version < self.floor:
            raise Refused(doc.version, "stale_version",
                          f"version {doc.version} is older than version {self.floor}, the latest accepted (a replay?)")
        if doc.version == self.version:
            return doc, None  # the one in force, sent again: nothing to check or change
        if doc.text is None:
            return doc, self.local
        try:
            policy = check_policy(doc.text, self.profile)
        except PolicyError as exc:
            raise Refused(doc.version, "invalid_policy", str(exc)) from None
        why_not = policy.targets(self.profile.name, self.region, self.tags)
        if why_not:
            raise Refused(doc.version, "not_targeted", why_not)
        return doc, msgspec.structs.replace(policy, version=doc.version, signed=True)


def _claimed_version(payload: bytes) -> int:
    """The version a policy says it is, unverified: only to tell the hub which push a device
    without a usable policy key refused; never used to decide anything here."""
    try:
        return unpack(unpack(payload, SignedEnvelope).payload, PolicyDocument).version
    except ProtocolError:
        return 0
