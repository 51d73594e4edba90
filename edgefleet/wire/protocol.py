"""The wire protocol: topic names and message schemas (the signing envelope: envelope.py).

Both the agent and the hub import this module; nothing about the protocol is written
anywhere else. Encoding lives here, I/O never does.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

PROTOCOL_VERSION: Final = 1
TOPIC_ROOT: Final = "edgefleet/v1"
# Ids end up inside topic names and ACL patterns: Mosquitto's %u patterns refuse
# '+' and '#', and '/' would split the topic (docs/mosquitto.md).
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Largest payload either side sends or accepts; the broker's max_packet_size sits just
# above it so the client-side check is the one that speaks first.
MAX_PAYLOAD_BYTES: Final = 256 * 1024
MAX_SEQ: Final = 2**63 - 1  # SQLite's INTEGER is signed 64-bit


class ProtocolError(ValueError):
    """A topic or payload that does not follow the protocol; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def validate_name(value: str, what: str = "device id") -> str:
    """Return `value` if it is a valid device or region id, else raise ProtocolError."""
    if not NAME_PATTERN.fullmatch(value):
        raise ProtocolError(
            "bad_name",
            f"{what} {value!r} is not allowed: use 1 to 64 of the characters A-Z a-z 0-9 _ -",
        )
    return value


def hub_identity(region: str) -> str:
    """The certificate CN of a region's hub; the '.' keeps it apart from every device id."""
    return f"hub.{validate_name(region, 'region')}"


# --- topics -------------------------------------------------------------------------

Channel = Literal["presence", "up", "down"]


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic: whose it is, which direction, and what kind of message."""

    device: str
    channel: Channel
    kind: str = ""


def presence_topic(device: str) -> str:
    return f"{TOPIC_ROOT}/dev/{device}/presence"


def up_topic(device: str, kind: str) -> str:
    """Device → hub."""
    return f"{TOPIC_ROOT}/dev/{device}/up/{kind}"


def down_topic(device: str, kind: str) -> str:
    """Hub → device."""
    return f"{TOPIC_ROOT}/dev/{device}/down/{kind}"


PRESENCE_FILTER: Final = f"{TOPIC_ROOT}/dev/+/presence"
UP_FILTER: Final = f"{TOPIC_ROOT}/dev/+/up/+"


def shared_filter(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription of the region's hub processes: each message goes to one of them.
    `group` is the hub's secret group name: a device that could name it would get messages' turns."""
    return f"$share/{validate_name(group, 'subscription group')}/{topic_filter}"


def down_filter(device: str) -> str:
    return f"{TOPIC_ROOT}/dev/{device}/down/+"


def parse_topic(topic: str) -> Topic:
    """Parse a topic of this protocol; the device id comes from the topic the broker authorised."""
    parts = topic.split("/")
    root = TOPIC_ROOT.split("/")
    if parts[: len(root)] != root or len(parts) < len(root) + 3 or parts[len(root)] != "dev":
        raise ProtocolError("bad_topic", f"not an edgefleet topic: {topic!r}")
    device, rest = parts[len(root) + 1], parts[len(root) + 2 :]
    validate_name(device)
    if rest == ["presence"]:
        return Topic(device, "presence")
    if len(rest) == 2 and rest[0] in ("up", "down") and NAME_PATTERN.fullmatch(rest[1]):
        channel: Channel = "up" if rest[0] == "up" else "down"
        return Topic(device, channel, rest[1])
    raise ProtocolError("bad_topic", f"unknown edgefleet topic: {topic!r}")


# --- messages -----------------------------------------------------------------------


# The one message a device legitimately retains: its size is bounded far below MAX_PAYLOAD_BYTES
# (a real one, with a few tags, is under 300 bytes), and the hub clears a larger one.
MAX_PRESENCE_BYTES: Final = 16 * 1024


def check_presence_size(data: bytes) -> None:
    if len(data) > MAX_PRESENCE_BYTES:
        raise ProtocolError("too_large", f"a presence of {len(data)} bytes > {MAX_PRESENCE_BYTES}")


class Presence(msgspec.Struct, frozen=True, kw_only=True):
    """Retained on the device's presence topic; the Last Will carries state='offline'."""

    state: Literal["online", "offline"]
    # One random id per connection, so a late Last Will of an old connection cannot
    # mark a device offline after its new connection said it is online.
    session: str
    agent_version: str = ""
    profile: str = ""
    tags: dict[str, str] = {}
    ts: float = 0.0


M = TypeVar("M", bound=msgspec.Struct)

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def _encode(encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder, message: msgspec.Struct) -> bytes:
    data = encoder.encode(message)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"{len(data)} bytes > {MAX_PAYLOAD_BYTES}")
    return data


def _decode(module: Any, data: bytes, kind: type[M]) -> M:
    """Size check, then decode and validate, mapping every defect to a ProtocolError reason."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("too_large", f"{len(data)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        result: M = module.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise ProtocolError("invalid", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("undecodable", str(exc)) from None
    except RecursionError:
        # msgspec descends into every nested value, unknown fields included: a few KiB of
        # nested arrays exhaust the interpreter's recursion limit.
        raise ProtocolError("too_deep", f"values nested beyond the recursion limit ({len(data)} bytes)") from None
    return result


def encode(message: msgspec.Struct) -> bytes:
    """JSON, for small messages people read (presence)."""
    return _encode(_json_encoder, message)


def decode(data: bytes, kind: type[M]) -> M:
    return _decode(msgspec.json, data, kind)


def pack(message: msgspec.Struct) -> bytes:
    """msgpack, for the data path: compact and fast for large batches."""
    return _encode(_msgpack_encoder, message)


def unpack(data: bytes, kind: type[M]) -> M:
    return _decode(msgspec.msgpack, data, kind)


# --- JSON text inside messages (event bodies, approval and task arguments) ------------------

# Deepest nesting of arrays and objects accepted in JSON text a message carries, and parsed by
# any reader of stored JSON; far above what the agent writes, far below Python's recursion limit.
MAX_JSON_DEPTH: Final = 32
MAX_UNREADABLE_SHOWN: Final = 120  # characters of an unreadable body shown, so that it can be found
# A string runs to its closing quote or, unterminated, to the end: one pass, no backtracking.
_JSON_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*+"?', re.DOTALL)
_JSON_BRACKET: Final = re.compile(r"[\[\]{}]")


def json_too_deep(text: str) -> bool:
    """Whether JSON text nests arrays and objects deeper than MAX_JSON_DEPTH (brackets in strings do not count).

    Linear and without recursion, so it is safe on any text; malformed text may count deeper than a
    parser would, never shallower."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            return True
    return False


def read_json(text: str) -> Any:
    """Parse JSON text that came from a device or a database; raise ProtocolError('too_deep' or 'undecodable')."""
    if json_too_deep(text):
        raise ProtocolError("too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ProtocolError("undecodable", f"not JSON: {exc}") from None


def json_body(text: str | None) -> dict[str, Any]:
    """A stored JSON body as an object for display, whatever it holds.

    Not an object: {"text": text}. Unreadable (too deep): {"unreadable": why, "text": its start}."""
    try:
        body = read_json(text or "{}")
    except ProtocolError as exc:
        if exc.reason != "too_deep":
            return {"text": text}
        return {"unreadable": exc.detail, "text": (text or "")[:MAX_UNREADABLE_SHOWN]}
    return body if isinstance(body, dict) else {"text": text}


# --- signed policies ------------------------------------------------------------------

POLICY: Final = "policy"  # down/policy (retained, signed) and the report fields in Status
MAX_POLICY_TEXT: Final = 64 * 1024  # characters of policy TOML; far above any real rule set
MAX_REFUSAL_DETAIL: Final = 2048


class PolicyDocument(msgspec.Struct, frozen=True, kw_only=True):
    """The signed payload of down/policy: one policy version for one device.

    The hub signs one document per device, so a policy cannot be replayed onto another
    device or profile. `text` None withdraws hub policies: the device returns to its local
    policy file (a rollback to "no hub policy" still carries a new, higher version).
    """

    version: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ)]
    device: str
    profile: str
    region: str = ""
    text: Annotated[str, msgspec.Meta(max_length=MAX_POLICY_TEXT)] | None = None
    issued_at: float = 0.0


class PolicyRefusal(msgspec.Struct, frozen=True, kw_only=True):
    """Why a device refused a policy (0: the version could not be read); reported in Status."""

    version: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    reason: Annotated[str, msgspec.Meta(max_length=64)]
    detail: Annotated[str, msgspec.Meta(max_length=MAX_REFUSAL_DETAIL)] = ""
    ts: float = 0.0


# --- store-and-forward messages (msgpack: compact and fast for large batches) ---------

MAX_EVENT_BODY: Final = 16_384  # characters of an event's JSON body
MAX_BATCH_RECORDS: Final = 20_000  # bounds the hub's work per message whatever the sender claims
METRIC_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TELEMETRY: Final = "telemetry"  # up/<kind> and down/<kind> names
ACK: Final = "ack"
STATUS: Final = "status"

Seq = Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ)]


class EventRecord(msgspec.Struct, frozen=True, array_like=True):
    """A decision or audit record: never shed, same sequence space as readings."""

    seq: Seq
    ts: float
    kind: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    body: Annotated[str, msgspec.Meta(max_length=MAX_EVENT_BODY)]  # JSON text


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """Readings and events with sequence numbers in (base, last], oldest first.

    Every sequence number in (base, last] that the batch does not carry was shed on the
    device (and counted there). `settled` declares everything <= base acknowledged or
    reported lost, so a hub that has no record of the device can start at base.
    """

    base: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    last: Seq
    settled: bool = False
    names: list[str] = []  # metric names, referenced by index from `metric`
    seq: list[Seq] = []
    ts: list[float] = []
    metric: list[Annotated[int, msgspec.Meta(ge=0)]] = []
    value: list[float] = []
    events: list[EventRecord] = []
    # The outbox that numbered these records (a random id; 0 from an agent that has none) and the
    # seq through which its records were numbered by an earlier one (a cloned image's, or before
    # the hub had it renumber): the hub tells two machines with one certificate apart by it.
    instance: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)] = 0
    inherited: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)] = 0
    machine: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)] = 0  # the board's number (edge_agent.buffer.machine)


class Renumber(msgspec.Struct, frozen=True, kw_only=True):
    """Part of an Ack: the batch was refused, not stored, because another machine uses these numbers
    with this device's certificate. Keep the records <= keep_through as they are; number the rest
    from resume_after + 1 on, in order, and send them again."""

    keep_through: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    resume_after: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ)]
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REFUSAL_DETAIL)] = ""


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    """Hub → device: every record with seq <= through is committed at the hub.

    `instance` (0: every instance) names the outbox it is for: with a cloned certificate both
    boards read this topic, and one must not delete what the other's ack covers."""

    through: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    instance: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)] = 0
    renumber: Renumber | None = None


# Every counter a device reports is stored in a signed 64-bit SQLite INTEGER.
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]


class FieldHealth(msgspec.Struct, frozen=True, kw_only=True):
    """One field sensor's health (edge_agent.sense.field.base.SensorHealth) as of the status."""

    state: Literal["starting", "ok", "failing"]
    since: float  # when it entered this state (device clock)
    reads: Count = 0
    errors: Count = 0  # failed polls
    rejected: Count = 0  # values skipped as bad (NaN, wrong length, ...)
    last_error: Annotated[str, msgspec.Meta(max_length=MAX_REFUSAL_DETAIL)] = ""
    kind: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """Device → hub, periodically: what the outbox holds and what quota shedding cost."""

    backlog: Count
    dropped: Count
    dropped_by_metric: dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], Count] = {}
    outbox_bytes: Count = 0
    corrupt_outboxes: Count = 0  # moved aside since install
    sensor_failures: dict[Annotated[str, msgspec.Meta(max_length=64)], Count] = {}
    ts: float = 0.0
    policy_version: Count = 0  # the signed policy in force; 0: none (a local policy file or no rules)
    policy_refused: PolicyRefusal | None = None  # the latest policy refused, while none newer was applied
    # Per field sensor; optional, so agents that have none (or predate it) and older hubs interoperate.
    field_sensors: dict[Annotated[str, msgspec.Meta(max_length=64)], FieldHealth] = {}


def check_batch(batch: Batch) -> int:
    """Sanity rules a schema cannot express; return the number of records. Raises ProtocolError."""
    n = len(batch.seq)
    if not (len(batch.ts) == len(batch.metric) == len(batch.value) == n):
        raise ProtocolError("invalid", "seq, ts, metric and value differ in length")
    total = n + len(batch.events)
    if total > MAX_BATCH_RECORDS:
        raise ProtocolError("too_many", f"{total} records > {MAX_BATCH_RECORDS}")
    if batch.last <= batch.base:
        raise ProtocolError("bad_sequence", f"last {batch.last} <= base {batch.base}")
    for name in batch.names:
        if not METRIC_PATTERN.fullmatch(name):
            raise ProtocolError("bad_metric", f"metric name {name[:80]!r}")
    if n and max(batch.metric) >= len(batch.names):
        raise ProtocolError("bad_metric", "metric index outside names")
    if not all(map(math.isfinite, batch.value)) or not all(map(math.isfinite, batch.ts)):
        raise ProtocolError("not_finite", "NaN or infinity in a value or timestamp")
    seqs = sorted([*batch.seq, *(e.seq for e in batch.events)])
    if seqs and (seqs[0] <= batch.base or seqs[-1] > batch.last):
        raise ProtocolError("bad_sequence", f"a sequence number outside ({batch.base}, {batch.last}]")
    if any(a >= b for a, b in itertools.pairwise(seqs)):
        raise ProtocolError("bad_sequence", "sequence numbers repeat or go backwards")
    if any(not math.isfinite(e.ts) for e in batch.events):
        raise ProtocolError("not_finite", "NaN or infinity in an event timestamp")
    deep = next((e.seq for e in batch.events if json_too_deep(e.body)), None)
    if deep is not None:  # stored, it would break every reader of the events
        raise ProtocolError("too_deep", f"the body of event {deep} nests deeper than {MAX_JSON_DEPTH} levels")
    return total


# --- regional coordination: leases, approvals, tasks (msgspec tagged unions, msgpack) ----

COORD: Final = "coord"  # up/coord (device → hub) and down/coord (hub → device)
RequestId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
LeaseName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Detail = Annotated[str, msgspec.Meta(max_length=MAX_REFUSAL_DETAIL)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)]


class LeaseRequest(msgspec.Struct, frozen=True, kw_only=True, tag="lease"):
    """Ask for a place among the `limit` holders of `name`; sent again (same id) after a reconnect."""

    id: RequestId
    name: LeaseName
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)]
    ttl_s: Seconds  # the hub takes the lease back after this, whatever happened to the holder
    rule: str = ""
    policy_version: Count = 0


class LeaseRelease(msgspec.Struct, frozen=True, kw_only=True, tag="release"):
    """Done (or no longer waiting: then `token` is 0 and the request leaves the queue)."""

    id: RequestId
    name: LeaseName
    token: Count = 0


class ApprovalRequest(msgspec.Struct, frozen=True, kw_only=True, tag="approval"):
    id: RequestId
    rule: str
    action: str
    args: Detail = "{}"  # JSON, for the operator to read
    policy_version: Count = 0
    expires_s: Seconds  # unanswered this long: treated as denied


class Bid(msgspec.Struct, frozen=True, kw_only=True, tag="bid"):
    """An answer to a TaskOffer: a score (higher is better), or `able` False with the reason."""

    task: Count
    able: bool
    score: float = 0.0
    detail: Detail = ""


class TaskDone(msgspec.Struct, frozen=True, kw_only=True, tag="task_done"):
    task: Count
    attempt: Count
    ok: bool
    refused: bool = False  # the device turned the award down; nothing ran
    detail: Detail = ""
    exit_code: int | None = None


CoordUp = LeaseRequest | LeaseRelease | ApprovalRequest | Bid | TaskDone


class LeaseGrant(msgspec.Struct, frozen=True, kw_only=True, tag="grant"):
    id: RequestId
    name: LeaseName
    token: Count  # the fencing token: only grows, per lease name, across hub restarts
    expires_in_s: Seconds


class LeaseQueued(msgspec.Struct, frozen=True, kw_only=True, tag="queued"):
    id: RequestId
    name: LeaseName
    position: Count  # 1: next in line


class ApprovalDecision(msgspec.Struct, frozen=True, kw_only=True, tag="decision"):
    id: RequestId
    approved: bool
    by: Detail = ""  # who decided ("expired" when nobody did in time)
    reason: Detail = ""


class TaskOffer(msgspec.Struct, frozen=True, kw_only=True, tag="offer"):
    task: Count
    kind: Annotated[str, msgspec.Meta(max_length=64)]
    args: Detail = "{}"  # JSON object: the actuator's arguments
    bid_by: float  # epoch seconds: bids after this are not considered


class TaskAward(msgspec.Struct, frozen=True, kw_only=True, tag="award"):
    task: Count
    attempt: Count  # only grows per task: a late answer to an older award is told apart
    kind: Annotated[str, msgspec.Meta(max_length=64)]
    args: Detail = "{}"
    timeout_s: Seconds


CoordDown = LeaseGrant | LeaseQueued | ApprovalDecision | TaskOffer | TaskAward


def pack_coord(message: CoordUp | CoordDown) -> bytes:
    return _encode(_msgpack_encoder, message)


def unpack_up(data: bytes) -> CoordUp:
    result: CoordUp = _decode(msgspec.msgpack, data, CoordUp)  # type: ignore[arg-type]  # a Union, not a class
    if isinstance(result, ApprovalRequest):
        _check_args(result.args)
    return result


def unpack_down(data: bytes) -> CoordDown:
    result: CoordDown = _decode(msgspec.msgpack, data, CoordDown)  # type: ignore[arg-type]  # a Union, not a class
    if isinstance(result, TaskOffer | TaskAward):
        _check_args(result.args)
    return result


def _check_args(args: str) -> None:
    """Arguments (JSON text) that are stored and read back must not nest beyond what readers parse."""
    if json_too_deep(args):
        raise ProtocolError("too_deep", f"args nest deeper than {MAX_JSON_DEPTH} levels")


# --- in-band certificate renewal (msgpack; docs/security.md, "Certificate lifecycle") ----

CERT: Final = "cert"  # up/cert (a request made on the device) and down/cert (the certificate, or why not)
MAX_PEM: Final = 16_384  # characters of a PEM request or certificate; an RSA-4096 one is under 2 KiB
UP_KINDS: Final = (TELEMETRY, STATUS, COORD, CERT)  # every up/<kind> the hub takes in; the ACL admits no other
# envelope.key_id of the request's public key (its DER SubjectPublicKeyInfo); "" when unreadable.
KeyId = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{16})?$")]
Pem = Annotated[str, msgspec.Meta(max_length=MAX_PEM)]


class CertRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Device → hub: a certificate request (PEM, CN = the device id) for a key made on the device.

    Sent again, the same, until answered; the hub answers a repeat with the same certificate."""

    csr: Pem


class CertIssued(msgspec.Struct, frozen=True, kw_only=True, tag="issued"):
    key_id: KeyId
    cert: Pem  # PEM


class CertRefused(msgspec.Struct, frozen=True, kw_only=True, tag="refused"):
    key_id: KeyId
    # unknown_device | revoked | wrong_subject | bad_request | rate_limited (a newer hub may add reasons)
    reason: Annotated[str, msgspec.Meta(max_length=64)]
    detail: Detail = ""


CertReply = CertIssued | CertRefused


def pack_cert(message: CertReply) -> bytes:
    return _encode(_msgpack_encoder, message)


def unpack_cert_reply(data: bytes) -> CertReply:
    result: CertReply = _decode(msgspec.msgpack, data, CertReply)  # type: ignore[arg-type]  # a Union, not a class
    return result
