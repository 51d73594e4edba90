"""Field actuators: GPIO set and pulse (at the gpiod boundary), the allowlists of MQTT topics and
GPIO outputs, and the profile and policy checks that refuse what is not listed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gpiod", reason="the gpio extra (gpiod) is not installed")

from edge_agent.config import load_settings
from edge_agent.decide.actuators import Actuators
from edgefleet.errors import ConfigError
from edgefleet.policy.check import check_policy
from edgefleet.policy.document import PolicyError
from edgefleet.policy.profiles import ActuatorSpec, GpioOutputSpec, load_profile
from tests.unit.test_unit_field import setup  # the agent.toml and profile the framework's tests use
from tests.unit.test_unit_gpio import FakeChip  # the gpiod boundary, faked once

SPEC = ActuatorSpec(
    allowed=["gpio_set", "gpio_pulse", "mqtt_publish"],
    mqtt_topics=["zigbee2mqtt/pump/set"],
    gpio_outputs=[GpioOutputSpec(name="relay", chip="gpiochip0", line="RELAY"),
                  GpioOutputSpec(name="valve", chip="/dev/gpiochip0", line=3, idle=True)],
)


def make(chip: FakeChip) -> Actuators:
    return Actuators(SPEC, gpio_opener=chip)


async def test_gpio_set_and_pulse_drive_only_listed_lines_and_end_idle() -> None:
    chip = FakeChip({"RELAY": 5})
    actuators = make(chip)
    result = await actuators.run("gpio_set", {"output": "relay", "value": True}, timeout=5.0)
    assert result.ok, result.detail
    assert result.detail == "relay set active."
    assert chip.physical[5] is True
    assert chip.physical[3] is True  # the valve was requested with its idle level
    result = await actuators.run("gpio_pulse", {"output": "valve", "seconds": 0.01}, timeout=5.0)
    assert result.ok, result.detail
    assert [level for line, level in chip.history if line == 3] == [True, False, True]
    refused = await actuators.run("gpio_set", {"output": "heater", "value": True}, timeout=5.0)
    assert refused.refused
    assert refused.detail == "GPIO output 'heater' is not allowed by this profile; allowed outputs: relay, valve."
    bad = await actuators.run("gpio_set", {"output": "relay", "value": 1}, timeout=5.0)
    assert not bad.ok
    assert "true or false" in bad.detail
    actuators.close()
    assert chip.physical[5] is False  # stopping puts every output back to idle
    assert chip.requests[0].released


async def test_a_pulse_cut_short_by_its_timeout_still_ends_idle() -> None:
    chip = FakeChip({"RELAY": 5})
    actuators = make(chip)
    result = await actuators.run("gpio_pulse", {"output": "relay", "seconds": 60}, timeout=0.2)
    assert result.timed_out
    assert [level for line, level in chip.history if line == 5] == [False, True, False]  # idle, pulse, idle
    assert chip.physical[5] is False
    actuators.close()


async def test_gpio_failure_is_an_outcome_not_an_exception() -> None:
    actuators = make(FakeChip({"RELAY": 5}, busy=True))
    result = await actuators.run("gpio_set", {"output": "relay", "value": True}, timeout=5.0)
    assert not result.ok
    assert "Device or resource busy" in result.detail


async def test_mqtt_publish_refuses_unlisted_topics_and_unknown_brokers() -> None:
    actuators = make(FakeChip({}))
    refused = await actuators.run("mqtt_publish", {"sensor": "zb", "topic": "zigbee2mqtt/heater/set",
                                                   "payload": "ON"}, timeout=5.0)
    assert refused.refused
    assert "allowed topics: zigbee2mqtt/pump/set" in refused.detail
    no_broker = await actuators.run("mqtt_publish", {"sensor": "zb", "topic": "zigbee2mqtt/pump/set",
                                                     "payload": "ON"}, timeout=5.0)
    assert not no_broker.ok
    assert "no local MQTT sensor named 'zb' on this device" in no_broker.detail


PROFILE = '''\
name = "relays"
description = "a board with a relay"

[budgets]
disk_mb = 32

[[sensors]]
kind = "system"
metrics = ["cpu_temp"]

[actuators]
allowed = ["gpio_set", "gpio_pulse", "mqtt_publish"]
mqtt_topics = ["zigbee2mqtt/fan/set"]
gpio_outputs = [{ name = "fan", chip = "gpiochip0", line = 17 }]
'''

POLICY = '''\
[[rules]]
name = "cool"
when = "cpu_temp > 70"
clear = "cpu_temp < 60"
action = "{action}"
args = {args}
offline = "act"
'''


def profile_at(tmp_path: Path, text: str = PROFILE) -> Path:
    (tmp_path / "relays.toml").write_text(text)
    return tmp_path


@pytest.mark.parametrize(("action", "args"), [
    ("gpio_pulse", '{ output = "fan", seconds = 30 }'),
    ("gpio_set", '{ output = "fan", value = true }'),
    ("mqtt_publish", '{ sensor = "zb", topic = "zigbee2mqtt/fan/set", payload = "{\\"state\\": \\"ON\\"}" }'),
])
def test_a_policy_within_the_allowlists_is_accepted(tmp_path: Path, action: str, args: str) -> None:
    profile = load_profile("relays", search=[profile_at(tmp_path)])
    policy = check_policy(POLICY.format(action=action, args=args), profile)
    assert policy.rules[0].action == action


@pytest.mark.parametrize(("action", "args", "why"), [
    ("gpio_set", '{ output = "heater", value = true }', "GPIO output 'heater' is not allowed"),
    ("gpio_pulse", '{ output = "fan", seconds = 7200 }', "bad args for gpio_pulse"),
    ("mqtt_publish", '{ sensor = "zb", topic = "zigbee2mqtt/door/set", payload = "OPEN" }',
     "MQTT topic 'zigbee2mqtt/door/set' is not allowed"),
])
def test_a_policy_outside_the_allowlists_is_refused_before_it_runs(
    tmp_path: Path, action: str, args: str, why: str,
) -> None:
    profile = load_profile("relays", search=[profile_at(tmp_path)])
    with pytest.raises(PolicyError, match=why):
        check_policy(POLICY.format(action=action, args=args), profile)


@pytest.mark.parametrize(("replace", "by", "why"), [
    ('mqtt_topics = ["zigbee2mqtt/fan/set"]', 'mqtt_topics = ["zigbee2mqtt/+/set"]',
     "actuators.mqtt_topics: 'zigbee2mqtt/+/set' is not a topic to publish to"),
    ('mqtt_topics = ["zigbee2mqtt/fan/set"]', "", 'actuators allow "mqtt_publish" but list no actuators.mqtt_topics'),
    ('{ name = "fan", chip = "gpiochip0", line = 17 }',
     '{ name = "fan", chip = "gpiochip0", line = 17 }, { name = "fan2", chip = "/dev/gpiochip0", line = 17 }',
     "actuators.gpio_outputs[1]: line 17 of /dev/gpiochip0 is listed twice"),
    ('gpio_outputs = [{ name = "fan", chip = "gpiochip0", line = 17 }]', "",
     "actuators allow gpio_set or gpio_pulse but list no [[actuators.gpio_outputs]]"),
])
def test_bad_field_allowlists_are_refused_at_start(tmp_path: Path, replace: str, by: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        load_profile("relays", search=[profile_at(tmp_path, PROFILE.replace(replace, by))])


def test_agent_toml_adds_topics_and_outputs_to_the_profiles_allowlists(tmp_path: Path) -> None:
    settings = load_settings(setup(tmp_path, '''
[actuators]
mqtt_topics = ["cmnd/plug/POWER"]
gpio_outputs = [{ name = "siren", chip = "gpiochip1", line = 4 }]
'''))
    spec = settings.profile.actuators
    assert {"alert", "mqtt_publish", "gpio_set", "gpio_pulse"} <= set(spec.allowed)
    assert spec.mqtt_topics == ["cmnd/plug/POWER"]
    assert [o.name for o in spec.gpio_outputs] == ["siren"]


def test_a_bad_topic_in_agent_toml_names_agent_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(setup(tmp_path, '[actuators]\nmqtt_topics = ["cmnd/#"]\n'))
    assert str(caught.value).startswith(f"{tmp_path / 'agent.toml'}: actuators.mqtt_topics: 'cmnd/#' is not a topic")
