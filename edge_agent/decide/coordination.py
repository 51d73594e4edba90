"""The agent's side of regional coordination: leases, approvals, and bids for tasks.

`HubCoordinator` is the rule engine's Coordinator: it asks the hub over up/coord and waits
for the answer on down/coord. Every request has its own id and is sent again after a
reconnect, so a partition during a wait costs only time; a wait is always bounded (the
lease's `wait_s`, the approval's timeout). What a rule does when the hub cannot be reached at
all is the engine's decision (`offline = "act" | "skip"`), not this module's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

from edgefleet.errors import PublishRefused, TransientError
from edgefleet.policy.allowlist import actuator_call
from edgefleet.policy.document import Rule
from edgefleet.policy.profiles import Profile
from edgefleet.wire.protocol import (
    ApprovalDecision,
    ApprovalRequest,
    CoordDown,
    CoordUp,
    LeaseGrant,
    LeaseQueued,
    LeaseRelease,
    LeaseRequest,
)

LEASE_TTL_MARGIN_S: Final = 30.0  # beyond the action's own timeout: the release has time to arrive
APPROVAL_MARGIN_S: Final = 5.0  # the hub's "expired" answer arrives before we give up on our own

log = logging.getLogger(__name__)

Send = Callable[[CoordUp], Awaitable[None]]


@dataclass
class _Waiting:
    request: LeaseRequest | ApprovalRequest
    answer: asyncio.Future[CoordDown]


class HubCoordinator:
    """Build with the function that publishes on up/coord (it raises while disconnected)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._waiting: dict[str, _Waiting] = {}
        self._held: dict[tuple[str, int], str] = {}  # (lease name, fencing token) -> request id
        self.positions: dict[str, int] = {}  # lease request id -> place in the hub's queue
        self.policy_version = 0  # of the rules asking; the agent sets it when it installs a policy

    async def lease(self, rule: Rule) -> tuple[bool, str]:
        assert rule.lease is not None
        timeout = actuator_call(rule)[2]
        request = LeaseRequest(id=secrets.token_hex(8), name=rule.lease.name, limit=rule.lease.limit,
                               ttl_s=timeout + LEASE_TTL_MARGIN_S, rule=rule.name,
                               policy_version=self.policy_version)
        answer = await self._ask(request, rule.lease.wait_s)
        if isinstance(answer, LeaseGrant):
            self._held[(answer.name, answer.token)] = request.id
            self.positions.pop(request.id, None)
            return True, str(answer.token)
        position = self.positions.pop(request.id, None)
        await self._quietly(LeaseRelease(id=request.id, name=request.name))  # leave the queue
        where = f" (place {position} in the queue)" if position else ""
        return False, f"no place within {rule.lease.wait_s:g} s{where}"

    async def release(self, rule: Rule, token: str) -> None:
        """Done with the lease (if the release is lost, the hub takes it back at its TTL)."""
        if rule.lease is None or not token.isdigit():
            return
        request = self._held.pop((rule.lease.name, int(token)), None)
        if request is not None:
            await self._quietly(LeaseRelease(id=request, name=rule.lease.name, token=int(token)))

    async def approve(self, rule: Rule) -> tuple[bool, str]:
        request = ApprovalRequest(id=secrets.token_hex(8), rule=rule.name, action=rule.action,
                                  args=_args_text(rule), expires_s=rule.approval_timeout_s,
                                  policy_version=self.policy_version)
        answer = await self._ask(request, rule.approval_timeout_s + APPROVAL_MARGIN_S)
        if isinstance(answer, ApprovalDecision):
            return answer.approved, answer.by if answer.approved else f"{answer.reason} ({answer.by})"
        return False, f"no decision within {rule.approval_timeout_s:g} s (treated as denied)"

    async def _ask(self, request: LeaseRequest | ApprovalRequest, wait_s: float) -> CoordDown | None:
        answer: asyncio.Future[CoordDown] = asyncio.get_running_loop().create_future()
        self._waiting[request.id] = _Waiting(request, answer)
        try:
            await self._quietly(request)  # if it cannot go now, on_connected sends it
            async with asyncio.timeout(wait_s):
                return await answer
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(request.id, None)

    async def on_connected(self) -> None:
        """Send every open request again: the hub answers the same to a repeat."""
        for waiting in list(self._waiting.values()):
            await self._quietly(waiting.request)

    async def on_message(self, message: CoordDown) -> None:
        if isinstance(message, LeaseQueued):
            if message.id in self._waiting:
                self.positions[message.id] = message.position
            return
        if not isinstance(message, LeaseGrant | ApprovalDecision):
            return
        waiting = self._waiting.get(message.id)
        if waiting is not None:
            if not waiting.answer.done():
                waiting.answer.set_result(message)
        elif isinstance(message, LeaseGrant) and (message.name, message.token) not in self._held:
            # A grant for a request we gave up on: hand it back at once.
            await self._quietly(LeaseRelease(id=message.id, name=message.name, token=message.token))

    async def _quietly(self, message: CoordUp) -> None:
        try:
            await self._send(message)
        except TransientError as exc:
            log.debug("coordination message not sent now (%s); it is sent again on reconnect", exc)
        except PublishRefused as exc:  # the broker said no: a reconnect will not change that
            log.warning("coordination message refused by the broker: %s", exc)


def _args_text(rule: Rule) -> str:
    """The action's arguments as the actuator gets them, for the operator deciding."""
    text = json.dumps(actuator_call(rule)[1], sort_keys=True)
    return text if len(text) <= 2000 else json.dumps({"truncated": text[:1900]})


# --- bidding ---------------------------------------------------------------------------


def bid_score(profile: Profile, device: str, state_dir: Path, backlog: int) -> tuple[float, str]:
    """How well placed this device is for a task (higher is better), and the figures behind it.

    idle CPU, free disk where the outbox lives and an empty outbox each weigh in; the sim
    profile's battery level scales the whole (a device about to run flat should not take work).
    """
    idle = max(0.0, 1.0 - psutil.cpu_percent(interval=None) / 100.0)
    usage = shutil.disk_usage(state_dir if state_dir.exists() else state_dir.parent)
    free = usage.free / usage.total if usage.total else 0.0
    quiet = 1.0 / (1.0 + backlog / 1000.0)
    score = 0.4 * idle + 0.3 * free + 0.3 * quiet
    detail = f"idle cpu {idle:.2f}, free disk {free:.2f}, backlog {backlog}"
    if any(s.kind == "sim" for s in profile.sensors):
        battery = profile.sim.battery if profile.sim.battery is not None else _sim_battery(device)
        score *= battery
        detail += f", battery {battery:.2f}"
    return round(score, 6), detail


def _sim_battery(device: str) -> float:
    return 0.2 + 0.8 * (int.from_bytes(hashlib.sha256(device.encode()).digest()[:2], "big") / 65535)
