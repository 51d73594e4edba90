"""The agent's intake of signed policies, on a real agent folder: verify, check, keep the last good one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.config import AgentSettings, load_settings
from edge_agent.decide import policy_intake
from edge_agent.decide.policy_intake import STORED_NAME, Outcome, PolicyIntake
from edgefleet.policy.document import Policy
from edgefleet.wire.envelope import SignedEnvelope
from edgefleet.wire.protocol import PolicyDocument, pack, unpack
from hub.rollout.signing import seal

DEVICE, REGION = "dev-1", "eu-1"

AGENT_TOML = """\
device_id = "dev-1"
profile = "sim"
region = "eu-1"
policy = "local-policy.toml"
policy_key = "policy.pub"

[tags]
site = "lab"

[broker]
host = "hub.example.net"

[state]
dir = "state"
"""

LOCAL_POLICY = """\
version = 5

[[rules]]
name = "local-rule"
when = "sig0 > 100"
clear = "sig0 < 90"
action = "record"
offline = "act"
"""


def hub_policy(rule: str = "hub-rule", *, version_line: str = "", target: str = "", when: str = "sig1 > 50") -> str:
    return f"""\
{version_line}
{target}
[[rules]]
name = "{rule}"
when = "{when}"
clear = "sig1 < 40"
action = "alert"
args = {{ message = "sig1 high" }}
offline = "act"
"""


@dataclass
class Agent:
    folder: Path
    settings: AgentSettings
    key: Ed25519PrivateKey

    @property
    def stored(self) -> Path:
        return self.settings.state_dir / STORED_NAME

    def intake(self) -> PolicyIntake:
        """A fresh intake, as at agent start (call load() next)."""
        return PolicyIntake(self.settings, self.settings.load_policy())

    def started(self) -> tuple[PolicyIntake, Policy | None]:
        intake = self.intake()
        return intake, intake.load()


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    folder = tmp_path / "agent"
    folder.mkdir()
    (folder / "agent.toml").write_text(AGENT_TOML, encoding="utf-8")
    (folder / "local-policy.toml").write_text(LOCAL_POLICY, encoding="utf-8")
    (folder / "state").mkdir()
    key = Ed25519PrivateKey.generate()
    (folder / "policy.pub").write_bytes(public_pem(key))
    return Agent(folder, load_settings(folder / "agent.toml"), key)


def document(version: int, text: str | None = None, *, device: str = DEVICE, profile: str = "sim",
             region: str = REGION) -> PolicyDocument:
    return PolicyDocument(version=version, device=device, profile=profile, region=region, text=text,
                          issued_at=1_700_000_000.0)


def signed(doc: PolicyDocument, key: Ed25519PrivateKey) -> bytes:
    """The down/policy payload, exactly as the hub's publisher builds it."""
    return pack(seal(pack(doc), key))


def offer(agent: Agent, intake: PolicyIntake, version: int, text: str | None = None, **fields: str) -> Outcome:
    return intake.offer(signed(document(version, text, **fields), agent.key))


def rule_names(policy: Policy | None) -> list[str]:
    assert policy is not None
    return [r.name for r in policy.rules]


def assert_refused(outcome: Outcome, reason: str, version: int | None = None) -> str:
    assert outcome.kind == "refused", outcome
    assert outcome.policy is None
    assert outcome.refusal is not None
    assert outcome.refusal.reason == reason, outcome.refusal
    if version is not None:
        assert outcome.version == outcome.refusal.version == version
    return outcome.refusal.detail


# --- a good policy ----------------------------------------------------------------------


def test_without_a_stored_policy_the_local_one_runs(agent: Agent) -> None:
    intake, policy = agent.started()
    assert rule_names(policy) == ["local-rule"]
    assert intake.version == 0
    assert intake.refused is None


def test_a_good_policy_is_applied_stored_and_survives_a_restart(agent: Agent) -> None:
    intake, _ = agent.started()
    payload = signed(document(7, hub_policy()), agent.key)
    outcome = intake.offer(payload)
    assert outcome.kind == "applied"
    assert outcome.version == intake.version == 7
    assert not outcome.withdrawn
    assert not outcome.repeated
    assert rule_names(outcome.policy) == ["hub-rule"]
    assert intake.refused is None
    assert agent.stored.read_bytes() == payload  # the envelope as received
    assert oct(agent.stored.stat().st_mode & 0o777) == oct(0o600)

    again, policy = agent.started()  # a new process
    assert again.version == 7
    assert rule_names(policy) == ["hub-rule"]
    assert policy is not None
    assert policy.version == 7


def test_the_applied_policy_carries_the_signed_version_not_the_files(agent: Agent) -> None:
    """Events are labelled with Policy.version: it must be what the hub numbered, whatever the file says."""
    intake, _ = agent.started()
    outcome = offer(agent, intake, 12, hub_policy(version_line="version = 3"))
    assert outcome.kind == "applied"
    assert outcome.policy is not None
    assert outcome.policy.version == 12
    _, policy = agent.started()
    assert policy is not None
    assert policy.version == 12


def test_a_policy_with_a_matching_target_is_applied(agent: Agent) -> None:
    intake, _ = agent.started()
    text = hub_policy(target='[target]\nprofile = "sim"\nregion = "eu-1"\ntags = { site = "lab" }\n')
    assert offer(agent, intake, 2, text).kind == "applied"


def test_a_policy_signed_without_region_is_accepted(agent: Agent) -> None:
    intake, _ = agent.started()
    assert offer(agent, intake, 2, hub_policy(), region="").kind == "applied"


def test_the_same_version_again_is_unchanged_and_not_rewritten(agent: Agent) -> None:
    intake, _ = agent.started()
    payload = signed(document(4, hub_policy()), agent.key)
    assert intake.offer(payload).kind == "applied"
    before = agent.stored.stat().st_mtime_ns
    os.utime(agent.stored, ns=(1, 1))
    outcome = intake.offer(payload)
    assert outcome == Outcome("unchanged", 4)
    # the retained message resent after a reconnect is signed anew (issued_at differs): still unchanged
    resent = signed(msgspec.structs.replace(document(4, hub_policy()), issued_at=2e9), agent.key)
    assert intake.offer(resent) == Outcome("unchanged", 4)
    assert agent.stored.stat().st_mtime_ns == 1 != before
    assert intake.version == 4


def test_newer_versions_replace_older_ones(agent: Agent) -> None:
    intake, _ = agent.started()
    assert offer(agent, intake, 2, hub_policy("first")).kind == "applied"
    outcome = offer(agent, intake, 9, hub_policy("second"))
    assert outcome.kind == "applied"
    assert rule_names(outcome.policy) == ["second"]
    _, policy = agent.started()
    assert rule_names(policy) == ["second"]


# --- refusals: the policy in force stays ----------------------------------------------------


@pytest.fixture
def running(agent: Agent) -> PolicyIntake:
    """An intake with version 3 (rule "good") in force."""
    intake, _ = agent.started()
    assert offer(agent, intake, 3, hub_policy("good")).kind == "applied"
    return intake


def assert_in_force(agent: Agent, intake: PolicyIntake, version: int = 3, rule: str = "good") -> None:
    assert intake.version == version
    restarted, policy = agent.started()
    assert restarted.version == version
    assert rule_names(policy) == [rule]


def test_a_tampered_payload_is_refused(agent: Agent, running: PolicyIntake) -> None:
    envelope = seal(pack(document(4, hub_policy("evil"))), agent.key)
    payload = bytearray(envelope.payload)
    at = bytes(payload).index(b"evil")
    payload[at] ^= 0x01  # "dvil": still a valid document, only the signature gives it away
    forged = pack(msgspec.structs.replace(envelope, payload=bytes(payload)))
    assert unpack(unpack(forged, SignedEnvelope).payload, PolicyDocument).text is not None
    detail = assert_refused(running.offer(forged), "bad_signature", 0)
    assert "does not match" in detail
    assert_in_force(agent, running)


def test_a_flipped_byte_anywhere_in_the_wire_payload_never_applies(agent: Agent, running: PolicyIntake) -> None:
    payload = signed(document(4, hub_policy("evil")), agent.key)
    for at in range(0, len(payload), 7):
        forged = bytearray(payload)
        forged[at] ^= 0x20
        outcome = running.offer(bytes(forged))
        assert outcome.kind == "refused", at
        assert outcome.refusal is not None
        assert outcome.refusal.reason in {"malformed", "bad_signature"}, (at, outcome.refusal)
    assert_in_force(agent, running)


def test_a_policy_signed_by_another_key_is_refused(agent: Agent, running: PolicyIntake) -> None:
    other = Ed25519PrivateKey.generate()
    detail = assert_refused(running.offer(signed(document(4, hub_policy("evil")), other)), "bad_signature", 0)
    assert "unknown key" in detail
    # the other key's signature under our key id: still refused
    envelope = seal(pack(document(4, hub_policy("evil"))), other)
    ours = seal(b"x", agent.key).key_id
    forged = pack(msgspec.structs.replace(envelope, key_id=ours))
    assert "does not match" in assert_refused(running.offer(forged), "bad_signature", 0)
    assert_in_force(agent, running)


def test_a_replay_of_an_older_version_is_refused(agent: Agent, running: PolicyIntake) -> None:
    old = signed(document(2, hub_policy("old")), agent.key)
    detail = assert_refused(running.offer(old), "stale_version", 2)
    assert "older than version 3" in detail
    assert_in_force(agent, running)


def test_a_replay_is_refused_after_a_restart_too(agent: Agent) -> None:
    intake, _ = agent.started()
    old = signed(document(2, hub_policy("old")), agent.key)
    assert intake.offer(old).kind == "applied"
    assert offer(agent, intake, 3, hub_policy("good")).kind == "applied"
    restarted, _ = agent.started()
    assert_refused(restarted.offer(old), "stale_version", 2)
    assert_in_force(agent, restarted)


@pytest.mark.parametrize("payload", [b"", b"garbage", b"\xff" * 40, pack(document(4, hub_policy()))],
                         ids=["empty", "text", "bytes", "unsigned-document"])
def test_a_payload_that_is_no_envelope_is_malformed(agent: Agent, running: PolicyIntake, payload: bytes) -> None:
    detail = assert_refused(running.offer(payload), "malformed", 0)
    assert "not a signed envelope" in detail
    assert_in_force(agent, running)


@pytest.mark.parametrize("inner", [b"garbage", msgspec.msgpack.encode({}), msgspec.msgpack.encode({"version": 0,
                                   "device": DEVICE, "profile": "sim"})], ids=["bytes", "empty-map", "version-0"])
def test_a_signed_blob_that_is_no_policy_document_is_malformed(agent: Agent, running: PolicyIntake,
                                                               inner: bytes) -> None:
    detail = assert_refused(running.offer(pack(seal(inner, agent.key))), "malformed", 0)
    assert "signed, but not a policy document" in detail
    assert_in_force(agent, running)


def test_an_invalid_policy_text_is_refused_with_line_and_column(agent: Agent, running: PolicyIntake) -> None:
    detail = assert_refused(offer(agent, running, 4, hub_policy(when="nosuch > 1")), "invalid_policy", 4)
    assert "line 5, column" in detail, detail
    assert "nosuch" in detail
    detail = assert_refused(offer(agent, running, 5, "[[rules]\nname = 1\n"), "invalid_policy", 5)
    assert "line 1, column" in detail, detail
    assert_in_force(agent, running)


def test_an_action_the_profile_does_not_allow_is_invalid(agent: Agent, running: PolicyIntake) -> None:
    text = hub_policy().replace('action = "alert"', 'action = "systemd_restart"').replace(
        'args = { message = "sig1 high" }', 'args = { unit = "x.service" }')
    detail = assert_refused(offer(agent, running, 4, text), "invalid_policy", 4)
    assert "not allowed by this device's profile" in detail
    assert_in_force(agent, running)


@pytest.mark.parametrize(("fields", "reason", "words"), [
    ({"device": "dev-2"}, "wrong_device", "'dev-2'"),
    ({"profile": "rpi-4"}, "wrong_profile", "'rpi-4'"),
    ({"region": "us-1"}, "wrong_region", "'us-1'"),
])
def test_a_policy_for_someone_else_is_refused(agent: Agent, running: PolicyIntake, fields: dict[str, str],
                                              reason: str, words: str) -> None:
    detail = assert_refused(offer(agent, running, 4, hub_policy("evil"), **fields), reason, 4)
    assert words in detail
    assert_in_force(agent, running)


@pytest.mark.parametrize("target", [
    '[target]\ntags = { site = "plant-b" }\n',
    '[target]\ntags = { rack = "7" }\n',
    '[target]\nregion = "us-1"\n',
    '[target]\nprofile = "rpi-4"\n',
])
def test_a_policy_whose_target_does_not_match_is_refused(agent: Agent, running: PolicyIntake, target: str) -> None:
    detail = assert_refused(offer(agent, running, 4, hub_policy("evil", target=target)), "not_targeted", 4)
    assert "the policy targets" in detail
    assert_in_force(agent, running)


SHORT_KEY = b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"


@pytest.mark.parametrize("content", [None, b"", b"not a key", SHORT_KEY], ids=["missing", "empty", "text", "short-key"])
def test_without_a_usable_policy_key_every_policy_is_refused(agent: Agent, running: PolicyIntake,
                                                             content: bytes | None) -> None:
    payload = signed(document(4, hub_policy("new")), agent.key)
    pub = agent.folder / "policy.pub"
    good = pub.read_bytes()
    if content is None:
        pub.unlink()
    else:
        pub.write_bytes(content)
    # The version is the one the document claims, unverified: it only tells the hub which push failed.
    detail = assert_refused(running.offer(payload), "no_policy_key", 4)
    assert "policy.pub" in detail
    assert running.version == 3
    # and at start: the stored one cannot be verified either, so the local policy runs
    restarted, policy = agent.started()
    assert rule_names(policy) == ["local-rule"]
    assert restarted.refused is not None
    assert restarted.refused.reason == "no_policy_key"
    pub.write_bytes(good)
    assert_in_force(agent, running)


def test_a_policy_key_of_another_algorithm_is_no_key(agent: Agent, running: PolicyIntake) -> None:
    from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

    ec = generate_private_key(SECP256R1()).public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (agent.folder / "policy.pub").write_bytes(ec)
    detail = assert_refused(offer(agent, running, 4, hub_policy()), "no_policy_key", 4)
    assert "not an Ed25519 public key" in detail
    assert running.version == 3


# --- repeated refusals and recovery ---------------------------------------------------------


def test_the_same_refusal_again_is_marked_repeated(agent: Agent, running: PolicyIntake) -> None:
    bad = signed(document(4, hub_policy(when="nosuch > 1")), agent.key)
    first = running.offer(bad)
    assert_refused(first, "invalid_policy", 4)
    assert not first.repeated
    assert running.refused == first.refusal
    second = running.offer(bad)
    assert_refused(second, "invalid_policy", 4)
    assert second.repeated
    # another refusal is news, and so is the first one coming back after it
    third = offer(agent, running, 4, hub_policy(), device="dev-2")
    assert_refused(third, "wrong_device", 4)
    assert not third.repeated
    assert not running.offer(bad).repeated
    assert running.version == 3


def test_a_newer_applied_version_clears_the_refusal(agent: Agent, running: PolicyIntake) -> None:
    assert_refused(offer(agent, running, 4, hub_policy(when="nosuch > 1")), "invalid_policy", 4)
    assert running.refused is not None
    outcome = offer(agent, running, 5, hub_policy("fixed"))
    assert outcome.kind == "applied"
    assert running.refused is None
    assert running.version == 5


def test_a_refusal_newer_than_the_applied_version_is_kept(agent: Agent, running: PolicyIntake) -> None:
    """The hub still needs to hear that 9 was refused after an older 4 is applied in between."""
    assert_refused(offer(agent, running, 9, hub_policy(when="nosuch > 1")), "invalid_policy", 9)
    assert offer(agent, running, 4, hub_policy("four")).kind == "applied"
    assert running.refused is not None
    assert running.refused.version == 9


def test_a_stale_refusal_does_not_count_as_a_refusal_of_the_version_in_force(agent: Agent,
                                                                             running: PolicyIntake) -> None:
    outcome = running.offer(signed(document(1, hub_policy("old")), agent.key))
    assert_refused(outcome, "stale_version", 1)
    assert running.refused is not None
    assert running.refused.version < running.version


# --- withdrawal -----------------------------------------------------------------------------


def test_a_withdrawal_brings_back_the_local_policy_and_is_kept(agent: Agent, running: PolicyIntake) -> None:
    payload = signed(document(6, None), agent.key)
    outcome = running.offer(payload)
    assert outcome.kind == "applied"
    assert outcome.withdrawn
    assert outcome.version == running.version == 6
    assert rule_names(outcome.policy) == ["local-rule"]
    assert agent.stored.read_bytes() == payload
    restarted, policy = agent.started()
    assert restarted.version == 6
    assert rule_names(policy) == ["local-rule"]
    # the withdrawn v3 cannot come back by replay
    assert_refused(offer(agent, restarted, 3, hub_policy("good")), "stale_version", 3)


def test_a_withdrawal_without_a_local_policy_leaves_no_rules(agent: Agent, running: PolicyIntake) -> None:
    intake = PolicyIntake(agent.settings, None)
    assert rule_names(intake.load()) == ["good"]
    outcome = intake.offer(signed(document(6, None), agent.key))
    assert outcome.kind == "applied"
    assert outcome.withdrawn
    assert outcome.policy is None


def test_an_older_withdrawal_is_a_replay(agent: Agent, running: PolicyIntake) -> None:
    assert_refused(running.offer(signed(document(2, None), agent.key)), "stale_version", 2)
    assert_in_force(agent, running)


# --- the stored file ----------------------------------------------------------------------


def test_when_the_policy_cannot_be_stored_it_is_refused(agent: Agent, running: PolicyIntake,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(policy_intake, "write_atomic", disk_full)
    outcome = offer(agent, running, 4, hub_policy("new"))
    detail = assert_refused(outcome, "store_failed", 4)
    assert "No space left on device" in detail
    assert running.version == 3
    assert running.refused == outcome.refusal
    assert running.offer(signed(document(4, hub_policy("new")), agent.key)).repeated
    monkeypatch.undo()
    assert_in_force(agent, running)
    # the disk is back: the same version now goes through
    assert offer(agent, running, 4, hub_policy("new")).kind == "applied"
    assert running.refused is None
    assert_in_force(agent, running, 4, "new")


def test_a_stored_file_that_was_tampered_with_is_not_used(agent: Agent, running: PolicyIntake) -> None:
    data = bytearray(agent.stored.read_bytes())
    at = bytes(data).index(b"good")
    data[at] ^= 0x01
    agent.stored.write_bytes(bytes(data))
    restarted, policy = agent.started()
    assert rule_names(policy) == ["local-rule"]
    assert restarted.version == 0  # a bad signature sets no floor: nothing about it can be trusted
    assert restarted.refused is not None
    assert restarted.refused.reason == "bad_signature"
    # the hub's resend of the real v3 puts it back
    assert offer(agent, restarted, 3, hub_policy("good")).kind == "applied"


def test_a_truncated_stored_file_falls_back_to_the_local_policy(agent: Agent, running: PolicyIntake) -> None:
    agent.stored.write_bytes(agent.stored.read_bytes()[:10])
    restarted, policy = agent.started()
    assert rule_names(policy) == ["local-rule"]
    assert restarted.refused is not None
    assert restarted.refused.reason == "malformed"


def test_a_stored_policy_no_longer_accepted_still_blocks_replays(agent: Agent, running: PolicyIntake) -> None:
    """The device's tags changed: the stored v3 no longer targets it, but v2 must not come back."""
    assert offer(agent, running, 4, hub_policy("lab-only", target='[target]\ntags = { site = "lab" }\n')).kind \
        == "applied"
    toml = agent.folder / "agent.toml"
    toml.write_text(AGENT_TOML.replace('site = "lab"', 'site = "plant-b"'), encoding="utf-8")
    agent.settings = load_settings(toml)
    restarted, policy = agent.started()
    assert rule_names(policy) == ["local-rule"]
    assert restarted.refused is not None
    assert restarted.refused.reason == "not_targeted"
    assert_refused(offer(agent, restarted, 2, hub_policy("old")), "stale_version", 2)
    assert offer(agent, restarted, 5, hub_policy("everyone")).kind == "applied"


def test_a_stored_policy_no_longer_accepted_is_not_reported_as_in_force(agent: Agent,
                                                                        running: PolicyIntake) -> None:
    assert offer(agent, running, 4, hub_policy("lab-only", target='[target]\ntags = { site = "lab" }\n')).kind \
        == "applied"
    toml = agent.folder / "agent.toml"
    toml.write_text(AGENT_TOML.replace('site = "lab"', 'site = "plant-b"'), encoding="utf-8")
    agent.settings = load_settings(toml)
    restarted, policy = agent.started()
    assert rule_names(policy) == ["local-rule"]  # the local policy runs ...
    # ... so the version reported to the hub (Status.policy_version = intake.version) must not claim v4,
    # and the refusal of v4 must be visible as a refusal newer than what is in force.
    assert restarted.version != 4
    assert restarted.refused is not None
    assert restarted.refused.version > restarted.version
