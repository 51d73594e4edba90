"""The wire protocol without a broker: names, topics, ACL, payloads and the signing envelope."""

from __future__ import annotations

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.decide.verify import open_envelope
from edgefleet.wire.envelope import SignedEnvelope, ed25519_public_from_pem, key_id
from edgefleet.wire.protocol import (
    MAX_PAYLOAD_BYTES,
    PRESENCE_FILTER,
    UP_FILTER,
    Presence,
    ProtocolError,
    Topic,
    decode,
    down_filter,
    down_topic,
    encode,
    hub_identity,
    parse_topic,
    presence_topic,
    up_topic,
    validate_name,
)
from hub.broker import acl_rules
from hub.rollout.signing import seal

# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "dev-01", "Dev_9", "x" * 64, "0", "-_-"])
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "x" * 65, "dev/1", "dev+", "dev#", "dev 1", "dev.1", "dév", "a\n", "+", "#", "$SYS"],
)
def test_names_that_would_break_topics_or_acls_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_name(name)
    assert info.value.reason == "bad_name"
    # The message tells the operator what is allowed.
    assert "A-Z a-z 0-9 _ -" in str(info.value)


def test_name_error_says_what_kind_of_id_was_wrong() -> None:
    with pytest.raises(ProtocolError, match="region"):
        validate_name("eu/west", "region")


def test_hub_identity_can_never_be_a_device_id() -> None:
    identity = hub_identity("eu-1")
    assert identity == "hub.eu-1"
    # A device could otherwise be provisioned with the hub's CN and gain its ACL rights.
    with pytest.raises(ProtocolError):
        validate_name(identity)


def test_hub_identity_refuses_a_bad_region() -> None:
    with pytest.raises(ProtocolError) as info:
        hub_identity("eu/1")
    assert info.value.reason == "bad_name"


# --- topics --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (presence_topic("dev-1"), Topic("dev-1", "presence")),
        (up_topic("dev-1", "telemetry"), Topic("dev-1", "up", "telemetry")),
        (down_topic("dev_2", "policy"), Topic("dev_2", "down", "policy")),
    ],
)
def test_topics_round_trip_and_name_the_device(topic: str, expected: Topic) -> None:
    assert parse_topic(topic) == expected


def test_the_device_comes_from_the_topic_not_the_payload() -> None:
    # A payload that claims another identity changes nothing: the topic the broker
    # authorised is the only source of the device id.
    payload = b'{"state": "online", "session": "s1", "device": "someone-else"}'
    presence = decode(payload, Presence)
    assert presence.state == "online"
    assert parse_topic(presence_topic("dev-1")).device == "dev-1"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "edgefleet",
        "edgefleet/v1",
        "edgefleet/v1/dev/dev-1",
        "edgefleet/v2/dev/dev-1/presence",
        "other/v1/dev/dev-1/presence",
        "edgefleet/v1/hub/dev-1/presence",
        "edgefleet/v1/dev/dev-1/status",
        "edgefleet/v1/dev/dev-1/presence/extra",
        "edgefleet/v1/dev/dev-1/up",
        "edgefleet/v1/dev/dev-1/up/",
        "edgefleet/v1/dev/dev-1/up/telemetry/",
        "edgefleet/v1/dev/dev-1/up/a/b",
        "edgefleet/v1/dev/dev-1/sideways/telemetry",
        "edgefleet/v1/dev/dev-1/up/+",
        "edgefleet/v1/dev/dev-1/up/#",
        "/edgefleet/v1/dev/dev-1/presence",
    ],
)
def test_foreign_or_malformed_topics_are_refused(topic: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_topic(topic)
    assert info.value.reason == "bad_topic"


@pytest.mark.parametrize(
    "topic",
    [
        PRESENCE_FILTER,
        UP_FILTER,
        "edgefleet/v1/dev/#/presence",
        "edgefleet/v1/dev//presence",
        "edgefleet/v1/dev/a.b/up/x",
    ],
)
def test_topics_with_an_impossible_device_id_are_refused(topic: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_topic(topic)
    assert info.value.reason == "bad_name"


# --- ACL -----------------------------------------------------------------------------


def _topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching: '+' is one level, '#' the rest."""
    p_parts, t_parts = pattern.split("/"), topic.split("/")
    for index, part in enumerate(p_parts):
        if part == "#":
            return True
        if index >= len(t_parts):
            return False
        if part not in ("+", t_parts[index]):
            return False
    return len(p_parts) == len(t_parts)


def _allowed(acl: str, user: str, topic: str, access: str) -> bool:
    """A small model of Mosquitto's acl_file: pattern lines for everyone, topic lines per user."""
    current: str | None = None
    for raw in acl.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "user":
            current = words[1]
            continue
        if words[0] == "pattern":
            rule_access, pattern = words[1], words[2].replace("%u", user)
        elif words[0] == "topic" and current == user:
            rule_access, pattern = words[1], words[2]
        else:
            continue
        if rule_access in (access, "readwrite") and _topic_matches(pattern, topic):
            return True
    return False


ACL = acl_rules([hub_identity("eu-1")])


@pytest.mark.parametrize(
    "topic", [presence_topic("dev-a"), *(up_topic("dev-a", kind) for kind in ("telemetry", "status", "coord", "cert"))]
)
def test_a_device_may_write_its_own_uplink(topic: str) -> None:
    assert _allowed(ACL, "dev-a", topic, "write")


@pytest.mark.parametrize("kind", ["events", "x0", "+", "#"])
def test_a_device_may_write_no_up_kind_the_hub_does_not_define(kind: str) -> None:
    """Anything there, retained, would stay at the broker: the hub takes no other kind in."""
    assert not _allowed(ACL, "dev-a", up_topic("dev-a", kind), "write")


@pytest.mark.parametrize(
    ("access", "topic"),
    [
        ("write", presence_topic("dev-b")),
        ("write", up_topic("dev-b", "telemetry")),
        ("write", down_topic("dev-a", "policy")),  # may not forge commands to itself
        ("write", down_topic("dev-b", "policy")),
        ("read", down_topic("dev-b", "policy")),
        ("read", up_topic("dev-b", "telemetry")),
        ("read", presence_topic("dev-b")),
        ("write", "edgefleet/v1/other"),
        ("read", "edgefleet/v1/#"),
    ],
)
def test_a_device_may_not_touch_other_devices_topics(access: str, topic: str) -> None:
    assert not _allowed(ACL, "dev-a", topic, access)


def test_a_device_reads_its_own_downlink() -> None:
    assert _allowed(ACL, "dev-a", down_topic("dev-a", "policy"), "read")


@pytest.mark.parametrize(
    ("access", "topic"),
    [
        ("read", up_topic("dev-a", "telemetry")),
        ("read", presence_topic("dev-b")),
        ("write", down_topic("dev-b", "policy")),
    ],
)
def test_the_hub_reads_and_writes_every_device(access: str, topic: str) -> None:
    assert _allowed(ACL, "hub.eu-1", topic, access)


def test_only_listed_hubs_get_hub_rights() -> None:
    assert not _allowed(ACL, "hub.us-1", down_topic("dev-b", "policy"), "write")


# --- payloads ------------------------------------------------------------------------


def test_presence_round_trips() -> None:
    message = Presence(state="online", session="abc", agent_version="0.1.0", profile="sim",
                       tags={"site": "lab"}, ts=12.5)
    assert decode(encode(message), Presence) == message


def test_encode_refuses_an_oversized_message() -> None:
    message = Presence(state="online", session="s", tags={"blob": "x" * MAX_PAYLOAD_BYTES})
    with pytest.raises(ProtocolError) as info:
        encode(message)
    assert info.value.reason == "too_large"


def test_decode_refuses_an_oversized_payload_before_parsing_it() -> None:
    data = b'{"state": "online", "session": "s", "agent_version": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    with pytest.raises(ProtocolError) as info:
        decode(data, Presence)
    assert info.value.reason == "too_large"


def test_a_payload_of_exactly_the_limit_is_accepted() -> None:
    head = b'{"state":"online","session":"s","agent_version":"'
    tail = b'"}'
    data = head + b"x" * (MAX_PAYLOAD_BYTES - len(head) - len(tail)) + tail
    assert len(data) == MAX_PAYLOAD_BYTES
    assert decode(data, Presence).state == "online"


@pytest.mark.parametrize(
    "data",
    [
        b'{"state": "maybe", "session": "s"}',
        b'{"state": "online"}',
        b'{"state": "online", "session": 7}',
        b'{"state": "online", "session": "s", "tags": {"a": 1}}',
        b'["online", "s"]',
        b"null",
    ],
)
def test_schema_violations_are_invalid(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data, Presence)
    assert info.value.reason == "invalid"


@pytest.mark.parametrize("data", [b"", b"not json", b'{"state": "online"', b"\xff\xfe\x00", b'{"state": online}'])
def test_garbage_is_undecodable(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data, Presence)
    assert info.value.reason == "undecodable"


def test_protocol_error_is_a_value_error_with_reason_and_detail() -> None:
    with pytest.raises(ValueError, match="undecodable: ") as info:
        decode(b"{", Presence)
    assert isinstance(info.value, ProtocolError)
    assert info.value.detail


# --- signing envelope ----------------------------------------------------------------


@pytest.fixture
def policy_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def raw(key: Ed25519PrivateKey) -> bytes:
    """The agent's form of the hub's public key (it verifies with PyNaCl, not cryptography)."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def test_a_pem_public_key_file_yields_the_raw_key(policy_key: Ed25519PrivateKey) -> None:
    assert ed25519_public_from_pem(pem(policy_key)) == raw(policy_key)


@pytest.mark.parametrize("data", [
    b"", b"not pem", b"-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n",
])
def test_what_is_not_a_pem_ed25519_key_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        ed25519_public_from_pem(data)
    assert info.value.reason == "bad_key"


def test_an_ec_public_key_is_not_taken_for_an_ed25519_one() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ProtocolError, match="not an Ed25519 public key"):
        ed25519_public_from_pem(ec_pem)


def test_a_sealed_payload_opens_with_the_signers_key(policy_key: Ed25519PrivateKey) -> None:
    envelope = seal(b'{"version": 3}', policy_key)
    assert open_envelope(envelope, raw(policy_key)) == b'{"version": 3}'


def test_an_envelope_survives_the_wire(policy_key: Ed25519PrivateKey) -> None:
    envelope = seal(b"\x00binary\xff policy", policy_key)
    received = decode(encode(envelope), SignedEnvelope)
    assert open_envelope(received, raw(policy_key)) == b"\x00binary\xff policy"


def test_a_tampered_payload_is_refused(policy_key: Ed25519PrivateKey) -> None:
    envelope = seal(b'{"version": 3, "max_reboots": 1}', policy_key)
    forged = msgspec.structs.replace(envelope, payload=b'{"version": 3, "max_reboots": 9}')
    with pytest.raises(ProtocolError) as info:
        open_envelope(forged, raw(policy_key))
    assert info.value.reason == "bad_signature"


def test_a_tampered_signature_is_refused(policy_key: Ed25519PrivateKey) -> None:
    envelope = seal(b"policy", policy_key)
    flipped = bytes([envelope.signature[0] ^ 1]) + envelope.signature[1:]
    with pytest.raises(ProtocolError) as info:
        open_envelope(msgspec.structs.replace(envelope, signature=flipped), raw(policy_key))
    assert info.value.reason == "bad_signature"


def test_an_envelope_from_another_key_is_refused(policy_key: Ed25519PrivateKey) -> None:
    envelope = seal(b"policy", Ed25519PrivateKey.generate())
    with pytest.raises(ProtocolError) as info:
        open_envelope(envelope, raw(policy_key))
    assert info.value.reason == "bad_signature"


def test_another_key_claiming_the_trusted_key_id_is_refused(policy_key: Ed25519PrivateKey) -> None:
    impostor = seal(b"policy", Ed25519PrivateKey.generate())
    forged = msgspec.structs.replace(impostor, key_id=key_id(raw(policy_key)))
    with pytest.raises(ProtocolError) as info:
        open_envelope(forged, raw(policy_key))
    assert info.value.reason == "bad_signature"


def test_a_wrong_key_id_is_refused_even_with_a_good_signature(policy_key: Ed25519PrivateKey) -> None:
    envelope = seal(b"policy", policy_key)
    with pytest.raises(ProtocolError) as info:
        open_envelope(msgspec.structs.replace(envelope, key_id="0" * 16), raw(policy_key))
    assert info.value.reason == "bad_signature"


def test_a_signature_made_outside_the_envelope_context_is_refused(policy_key: Ed25519PrivateKey) -> None:
    # Domain separation: a signature the key made over the bare bytes (for some other
    # purpose) must not pass as an envelope signature.
    payload = b"policy"
    envelope = SignedEnvelope(key_id=key_id(raw(policy_key)), payload=payload,
                              signature=policy_key.sign(payload))
    with pytest.raises(ProtocolError) as info:
        open_envelope(envelope, raw(policy_key))
    assert info.value.reason == "bad_signature"


def test_key_ids_differ_between_keys(policy_key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    assert key_id(raw(policy_key)) == key_id(raw(policy_key))
    assert key_id(raw(policy_key)) != key_id(raw(other))


def test_down_filter_matches_only_that_devices_downlink() -> None:
    assert _topic_matches(down_filter("dev-a"), down_topic("dev-a", "policy"))
    assert not _topic_matches(down_filter("dev-a"), down_topic("dev-b", "policy"))
    assert _topic_matches(UP_FILTER, up_topic("dev-a", "telemetry"))
    assert _topic_matches(PRESENCE_FILTER, presence_topic("dev-a"))
