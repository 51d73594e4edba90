"""The sysfs, exec, local MQTT and GPIO declarations in agent.toml: accepted as written in
docs/sensors.md, refused with one sentence naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_settings
from edgefleet.errors import ConfigError
from edgefleet.policy.field import ExecSensorSpec, GpioSensorSpec, MqttSensorSpec, SysfsSensorSpec
from tests.unit.test_unit_field import setup  # the agent.toml and profile the framework's tests use

DOCUMENTED = """
[[sensors]]
kind = "sysfs"
name = "air"
source = "iio"
device = "bme280"
channels = ["temp", "pressure", "humidityrelative"]

[[sensors]]
kind = "exec"
name = "ble"
argv = ["/usr/local/bin/ble-scan", "--json"]

[[sensors]]
kind = "mqtt"
name = "zigbee"
host = "127.0.0.1"
topics = [
  { topic = "zigbee2mqtt/kitchen", points = { temp = "temperature", rh = "humidity" }, ts_field = "last_seen" },
  { topic = "shellies/plug/relay/0/power", points = { power = "" } },
]

[[sensors]]
kind = "gpio"
name = "water"
chip = "gpiochip0"
lines = [
  { name = "pulses", line = 17, mode = "counter", bias = "pull-up", debounce_ms = 20 },
  { name = "door", line = "DOOR_SENSE" },
]
"""


def load(tmp_path: Path, extra: str) -> list[object]:
    return list(load_settings(setup(tmp_path, extra)).profile.field_sensors)


def refused(tmp_path: Path, extra: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, extra)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "agent.toml") + ": "), message
    return message


def test_the_documented_declarations_load(tmp_path: Path) -> None:
    air, ble, zigbee, water = load(tmp_path, DOCUMENTED)
    assert isinstance(air, SysfsSensorSpec)
    assert air.points() == {"air.temp", "air.pressure", "air.humidityrelative"}
    assert isinstance(ble, ExecSensorSpec)
    assert ble.points() is None
    assert isinstance(zigbee, MqttSensorSpec)
    assert zigbee.points() == {"zigbee.temp", "zigbee.rh", "zigbee.power"}
    assert isinstance(water, GpioSensorSpec)
    assert water.lines[1].line == "DOOR_SENSE"


@pytest.mark.parametrize(("extra", "expected"), [
    ('[[sensors]]\nkind = "sysfs"\nname = "a"\nsource = "i2c"\ndevice = "x"\n',
     "sensors[0].source"),
    ('[[sensors]]\nkind = "sysfs"\nname = "a"\nsource = "iio"\ndevice = "../x"\n',
     "sensors[0].device = '../x' is not a device name"),
    ('[[sensors]]\nkind = "sysfs"\nname = "a"\nsource = "iio"\ndevice = "x"\nroot = "sys"\n',
     "sensors[0].root = 'sys' must be an absolute path"),
    ('[[sensors]]\nkind = "exec"\nname = "p"\nargv = []\n', "sensors[0].argv is empty"),
    ('[[sensors]]\nkind = "exec"\nname = "p"\nargv = "ble-scan --json"\n', "sensors[0].argv"),
    ('[[sensors]]\nkind = "exec"\nname = "p"\nargv = ["x"]\nshell = true\n', "shell"),
    ('[[sensors]]\nkind = "mqtt"\nname = "m"\ntopics = []\n', "sensors[0].topics is empty"),
    ('[[sensors]]\nkind = "mqtt"\nname = "m"\ntopics = [{ topic = "a/b#", points = { v = "" } }]\n',
     "sensors[0].topics[0].topic = 'a/b#' is not an MQTT topic filter"),
    ('[[sensors]]\nkind = "mqtt"\nname = "m"\ntopics = [{ topic = "a", points = {} }]\n',
     "sensors[0].topics[0].points is empty"),
    ('[[sensors]]\nkind = "mqtt"\nname = "m"\npassword_file = "/etc/pw"\n'
     'topics = [{ topic = "a", points = { v = "" } }]\n',
     "sensors[0].password_file needs sensors[0].username"),
    ('[[sensors]]\nkind = "mqtt"\nname = "m"\ntopics = [{ topic = "a", points = { "bad name" = "" } }]\n',
     "point name 'bad name' is not valid"),
    ('[[sensors]]\nkind = "gpio"\nname = "g"\nchip = "gpiochip0"\nlines = [{ name = "a", line = 1 },'
     ' { name = "b", line = 1 }]\n', "line 1 is listed twice"),
    ('[[sensors]]\nkind = "gpio"\nname = "g"\nchip = "gpiochip0"\nlines = [{ name = "a", line = 1, mode = "pwm" }]\n',
     "sensors[0].lines[0].mode"),
    ('[[sensors]]\nkind = "gpio"\nname = "g"\nchip = "gpiochip0"\nlines = []\n', "sensors[0].lines is empty"),
])
def test_bad_declarations_are_refused_with_the_key(tmp_path: Path, extra: str, expected: str) -> None:
    assert expected in refused(tmp_path, extra)
