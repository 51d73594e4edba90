"""Plugin kinds through entry points, from a real installed distribution (a dist-info folder with
entry_points.txt on sys.path, as pip lays one out), not by patching importlib."""

from __future__ import annotations

import asyncio
import importlib
import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config import load_settings
from edge_agent.decide.actuators import Actuators
from edge_agent.sense.field.base import FieldSensors
from edge_agent.sense.field.entrypoints import (
    ACTUATOR_GROUP,
    SENSOR_GROUP,
    PluginFieldSensor,
    PluginSensor,
    PluginSource,
    available,
    build_actuator,
    build_sensor,
)
from edge_agent.sense.sensors import Reading
from edgefleet.errors import ConfigError
from edgefleet.policy.profiles import load_profile
from tests.support.field import Collected
from tests.unit.test_unit_field import setup  # the agent.toml and profile the framework's tests use

PLUGIN = '''
import asyncio
from edge_agent.sense.sensors import Reading

class Station:
    def __init__(self, name, options):
        if "height_m" not in options:
            raise ValueError("weather_station needs height_m: the station's height in metres")
        self.name, self.interval, self.height = name, float(options.get("interval_s", 5.0)), options["height_m"]

    def read(self, now):
        return [Reading(f"{self.name}.height", now, float(self.height))]

class Feed:
    def __init__(self, name):
        self.name = name

    async def run(self, sink):
        sink([Reading(f"{self.name}.tick", 1.0, 1.0)])
        await asyncio.sleep(3600)

class Siren:
    def __init__(self):
        self.calls = []

    async def write(self, args):
        self.calls.append(dict(args))
        return f"siren {args['tone']}"

def build_sensor(name, options):
    return Station(name, options)

def build_feed(name, options):
    return Feed(name)

def build_siren(name, options):
    return Siren()

def build_nothing(name, options):
    return 42
'''


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    """`acme_ws` 1.0 installed into a folder on sys.path, as `pip install --target` leaves it."""
    (tmp_path / "acme_ws").mkdir()
    (tmp_path / "acme_ws" / "__init__.py").write_text("")
    (tmp_path / "acme_ws" / "edge.py").write_text(PLUGIN)
    (tmp_path / "acme_ws" / "broken.py").write_text("raise RuntimeError('needs a driver that is not installed')\n")
    info = tmp_path / "acme_ws-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-ws\nVersion: 1.0\n")
    (info / "RECORD").write_text("")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{SENSOR_GROUP}]
        weather_station = acme_ws.edge:build_sensor
        acme_feed = acme_ws.edge:build_feed
        acme_nothing = acme_ws.edge:build_nothing
        acme_broken = acme_ws.broken:build

        [{ACTUATOR_GROUP}]
        siren = acme_ws.edge:build_siren
        """))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == "acme_ws" or m.startswith("acme_ws.")]:
            del sys.modules[module]
        importlib.invalidate_caches()


def test_installed_kinds_are_listed_without_importing_them(installed: Path) -> None:
    assert {"weather_station", "acme_feed", "acme_broken"} <= set(available(SENSOR_GROUP))
    assert "siren" in available(ACTUATOR_GROUP)
    assert "acme_ws.broken" not in sys.modules


def test_a_polled_plugin_sensor_reads(installed: Path) -> None:
    sensor = build_sensor("weather_station", "roof", {"height_m": 12}, "agent.toml")
    assert isinstance(sensor, PluginSensor)
    assert sensor.read(5.0) == [("roof.height", 5.0, 12.0)]


async def test_a_pushing_plugin_source_and_an_actuator(installed: Path) -> None:
    source = build_sensor("acme_feed", "feed", {}, "agent.toml")
    assert isinstance(source, PluginSource)
    assert not isinstance(source, PluginSensor)
    siren = build_actuator("siren", "yard", {}, "agent.toml")
    assert await siren.write({"tone": "high"}) == "siren high"


def test_plugin_errors_are_config_errors_that_name_the_file_and_the_fix(installed: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent.toml: roof \(kind 'weather_station'\): weather_station needs"):
        build_sensor("weather_station", "roof", {}, "agent.toml")
    with pytest.raises(ConfigError, match=r"loading acme_ws.broken:build failed: RuntimeError: needs a driver"):
        build_sensor("acme_broken", "b", {}, "agent.toml")
    with pytest.raises(ConfigError, match=r"returned int, which has neither read\(now\)"):
        build_sensor("acme_nothing", "n", {}, "agent.toml")
    with pytest.raises(ConfigError, match=r"kind 'zigbee' is neither built in nor offered .*acme_feed.*install the"):
        build_sensor("zigbee", "z", {}, "agent.toml")


def test_without_the_package_the_kind_is_unknown() -> None:
    assert "weather_station" not in available(SENSOR_GROUP)


PLUGIN_SENSOR = """
[[sensors]]
kind = "plugin"
plugin = "{plugin}"
name = "roof"
interval_s = 0.05
options = {{ height_m = 12 }}
"""


def _settings(tmp_path: Path, plugin: str) -> Path:
    return setup(tmp_path, PLUGIN_SENSOR.format(plugin=plugin))


async def test_a_plugin_declared_in_agent_toml_runs_under_the_field_runtime(installed: Path, tmp_path: Path) -> None:
    settings = load_settings(_settings(tmp_path, "weather_station"))
    sink = Collected()
    field = FieldSensors.from_specs(settings.profile.field_sensors, sink, lambda kind, body: None)
    task = asyncio.create_task(field.run())
    try:
        await sink.until(2)
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert {r.metric for r in sink.readings} == {"roof.height"}
    assert field.health["roof"].state == "ok"


def test_a_plugin_no_package_offers_is_refused_at_start(installed: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent.toml: sensors\[0\].plugin = 'zigbee' is offered by no installed "
                                          r"package \(entry point group edgefleet.sensors: acme_broken, acme_feed"):
        load_settings(_settings(tmp_path, "zigbee"))


async def test_plugin_readings_must_be_named_after_the_sensor(installed: Path) -> None:
    class Stray:
        name, interval = "roof", 1.0

        def read(self, now: float) -> list[Reading]:
            return [Reading("roof.ok", now, 1.0), Reading("other.x", now, 2.0), Reading("roof.nan", now, math.nan)]

    rejected: list[str] = []
    sensor = PluginFieldSensor("roof", Stray(), 1.0, lambda: 5.0)
    assert [r.metric for r in sensor._checked(Stray().read(5.0), rejected.append)] == ["roof.ok"]
    assert rejected == ["the plugin gave metric 'other.x', not roof.<point>", "the plugin gave roof.nan = nan"]
    assert [r.metric for r in await sensor.probe()] == ["roof.ok"]


PLUGIN_ACTUATOR = """
[[actuators.plugins]]
name = "yard"
plugin = "{plugin}"
"""


async def test_a_plugin_actuator_listed_in_the_profile_writes(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "relays.toml").write_text(RELAYS.replace('allowed = ["alert"]', 'allowed = ["plugin"]')
                                          + PLUGIN_ACTUATOR.format(plugin="siren"))
    profile = load_profile("relays", search=[tmp_path])
    actuators = Actuators(profile.actuators)
    result = await actuators.run("plugin", {"actuator": "yard", "values": {"tone": "high"}}, timeout=5.0)
    assert result.ok, result.detail
    assert result.detail == "yard: siren high"
    refused = await actuators.run("plugin", {"actuator": "gate", "values": {}}, timeout=5.0)
    assert refused.refused
    assert refused.detail == "plugin actuator 'gate' is not allowed by this profile; allowed: yard."
    failed = await actuators.run("plugin", {"actuator": "yard", "values": {}}, timeout=5.0)
    assert not failed.ok
    assert failed.detail == "yard failed: KeyError: 'tone'"


def test_a_plugin_actuator_no_package_offers_is_refused_at_start(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "relays.toml").write_text(RELAYS.replace('allowed = ["alert"]', 'allowed = ["plugin"]')
                                          + PLUGIN_ACTUATOR.format(plugin="horn"))
    with pytest.raises(ConfigError, match=r"actuators.plugins\[0\].plugin = 'horn' is offered by no installed "
                                          r"package \(entry point group edgefleet.actuators: siren\)"):
        load_profile("relays", search=[tmp_path])


RELAYS = """\
name = "relays"
description = "a board with a yard siren"

[budgets]
disk_mb = 32

[[sensors]]
kind = "system"
metrics = ["cpu_temp"]

[actuators]
allowed = ["alert"]
"""
