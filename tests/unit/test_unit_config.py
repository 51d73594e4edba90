"""agent.toml, firmware profiles and `--set` overrides, loaded from files as an operator writes them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_agent.config import load_settings
from edgefleet.errors import ConfigError
from edgefleet.policy.profiles import PROFILE_DIRS, SYSTEM_METRICS, available_profiles, load_profile

AGENT_TOML = """\
device_id = "dev-1"
profile = "sim"
region = "eu-1"

[tags]
site = "lab"

[broker]
host = "hub.example.net"
port = 8883

[tls]
ca = "ca.crt"
cert = "device.crt"
key = "device.key"

[state]
dir = "state"
"""

GOOD_PROFILE = """\
name = "{name}"
description = "a test board"

[budgets]
disk_mb = 32

[[sensors]]
kind = "system"
metrics = ["cpu_percent", "load1"]

[actuators]
allowed = ["alert"]
"""


def write_config(folder: Path, text: str = AGENT_TOML) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def write_profile(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- agent.toml ----------------------------------------------------------------------


def test_a_provisioned_config_loads_with_its_profile(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path / "bundle"))
    assert settings.config.device_id == "dev-1"
    assert settings.config.region == "eu-1"
    assert settings.config.tags == {"site": "lab"}
    assert settings.config.broker.host == "hub.example.net"
    assert settings.config.broker.port == 8883
    assert settings.profile.name == "sim"
    assert settings.profile.sim.signals == 4


def test_defaults_fill_what_the_file_leaves_out(tmp_path: Path) -> None:
    minimal = 'device_id = "dev-1"\nprofile = "sim"\n[broker]\nhost = "h"\n'
    settings = load_settings(write_config(tmp_path, minimal))
    assert settings.config.broker.port == 8883
    assert settings.config.log_level == "info"
    assert settings.tls.key == tmp_path.resolve() / "device.key"


def test_relative_paths_follow_the_bundle_when_it_moves(tmp_path: Path) -> None:
    original = tmp_path / "provisioned" / "dev-1"
    before = load_settings(write_config(original))
    assert before.tls.ca == original.resolve() / "ca.crt"
    assert before.tls.cert == original.resolve() / "device.crt"
    assert before.tls.key == original.resolve() / "device.key"
    assert before.state_dir == original.resolve() / "state"

    moved = tmp_path / "etc" / "edge-agent"
    moved.parent.mkdir(parents=True)
    shutil.move(original, moved)
    after = load_settings(moved / "agent.toml")
    assert after.tls.ca == moved.resolve() / "ca.crt"
    assert after.tls.cert == moved.resolve() / "device.crt"
    assert after.tls.key == moved.resolve() / "device.key"
    assert after.state_dir == moved.resolve() / "state"


def test_relative_paths_resolve_against_the_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle"
    write_config(bundle)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path("../bundle/agent.toml"))
    assert settings.tls.ca == bundle.resolve() / "ca.crt"
    assert settings.state_dir == bundle.resolve() / "state"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    text = AGENT_TOML.replace('dir = "state"', 'dir = "/var/lib/edge-agent"')
    settings = load_settings(write_config(tmp_path, text))
    assert settings.state_dir == Path("/var/lib/edge-agent")


@pytest.mark.parametrize("device_id", ["dev/1", "dev+1", "dev#", "", "x" * 65, "hub.eu-1", "dev 1"])
def test_an_invalid_device_id_is_a_config_error(tmp_path: Path, device_id: str) -> None:
    path = write_config(tmp_path, AGENT_TOML.replace('"dev-1"', f'"{device_id}"'))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.path == str(path)
    assert "device id" in str(info.value)


def test_an_invalid_region_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, AGENT_TOML.replace('"eu-1"', '"eu/1"'))
    with pytest.raises(ConfigError, match="region"):
        load_settings(path)


def test_a_missing_config_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_settings(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)


def test_invalid_toml_in_agent_toml_names_line_and_column(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'device_id = "dev-1"\nprofile = sim\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "line 2" in str(info.value)
    assert "column" in str(info.value)


def test_an_unknown_key_in_agent_toml_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, AGENT_TOML.replace("port = 8883", "port = 8883\nprot = 1"))
    with pytest.raises(ConfigError, match="prot"):
        load_settings(path)


def test_a_missing_required_key_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'device_id = "dev-1"\nprofile = "sim"\n')
    with pytest.raises(ConfigError, match="broker"):
        load_settings(path)


def test_a_config_naming_an_unknown_profile_lists_the_available_ones(tmp_path: Path) -> None:
    path = write_config(tmp_path, AGENT_TOML.replace('profile = "sim"', 'profile = "rpi-9"'))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "rpi-9" in str(info.value)
    assert "rpi-5" in str(info.value)


# --- --set overrides -----------------------------------------------------------------


def test_overrides_reach_the_config_and_the_profile(tmp_path: Path) -> None:
    settings = load_settings(
        write_config(tmp_path), ["broker.port=1884", "sim.rate_hz=10", "sim.signals=3", "log_level=\"debug\""]
    )
    assert settings.config.broker.port == 1884
    assert settings.config.log_level == "debug"
    assert settings.profile.sim.rate_hz == 10.0
    assert settings.profile.sim.signals == 3
    # Everything not overridden stays as the files say.
    assert settings.config.broker.host == "hub.example.net"
    assert settings.profile.budgets.disk_mb == 64


def test_overrides_change_only_this_run_not_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    load_settings(path, ["broker.port=1884"])
    assert path.read_text(encoding="utf-8") == AGENT_TOML
    assert load_settings(path).config.broker.port == 8883
    assert load_settings(path).profile.sim.rate_hz == 1.0


def test_an_unquoted_string_override_is_taken_as_a_string(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path), ["broker.host=10.0.0.5", "log_level=warning"])
    assert settings.config.broker.host == "10.0.0.5"
    assert settings.config.log_level == "warning"


def test_an_override_can_switch_the_profile(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path), ["profile=rpi-4"])
    assert settings.profile.name == "rpi-4"


def test_an_override_can_add_a_nested_table_value(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path), ["tags.rack=r7", "budgets.disk_mb=8"])
    assert settings.config.tags == {"site": "lab", "rack": "r7"}
    assert settings.profile.budgets.disk_mb == 8


def test_an_unknown_setting_is_refused_with_the_list_of_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path), ["brokr.port=1884"])
    message = str(info.value)
    assert "'brokr'" in message
    for valid in ("broker", "sim", "budgets", "device_id", "sensors"):
        assert valid in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("broker.port=fast", "broker.port"),
        ("broker.port=70000", "broker.port"),
        ("sim.rate_hz=quick", "sim.rate_hz"),
        ("sim.signals=2.5", "sim.signals"),
        ("sim.signals=0", "sim.signals"),
        ("budgets.disk_mb=-1", "budgets.disk_mb"),
        ("broker.keepalive=true", "broker.keepalive"),
    ],
)
def test_a_bad_override_value_names_the_key(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path), [override])
    assert key in str(info.value)


@pytest.mark.parametrize("override", ["broker.port", "=3", "broker..port=3", ".port=3"])
def test_a_malformed_override_shows_the_expected_form(tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_settings(write_config(tmp_path), [override])


def test_an_override_below_a_plain_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a table"):
        load_settings(write_config(tmp_path), ["broker.host.name=x"])


# --- the shipped profiles ------------------------------------------------------------

SHIPPED = ["generic-linux", "rpi-4", "rpi-5", "rpi-zero-2w", "sim"]


def test_all_shipped_profiles_are_available() -> None:
    assert set(SHIPPED) <= set(available_profiles())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.sensors
    assert profile.budgets.disk_mb > 0
    for sensor in profile.sensors:
        assert set(sensor.metrics) <= SYSTEM_METRICS


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_works_in_an_agent_config(tmp_path: Path, name: str) -> None:
    path = write_config(tmp_path, AGENT_TOML.replace('profile = "sim"', f'profile = "{name}"'))
    assert load_settings(path).profile.name == name


def test_profiles_are_found_in_the_checkout() -> None:
    assert any((d / "sim.toml").is_file() for d in PROFILE_DIRS)


# --- broken profiles -----------------------------------------------------------------


def test_a_good_profile_in_a_custom_folder_loads(tmp_path: Path) -> None:
    write_profile(tmp_path, "board-x", GOOD_PROFILE.format(name="board-x"))
    profile = load_profile("board-x", search=[tmp_path])
    assert profile.sensors[0].metrics == ["cpu_percent", "load1"]


def _refused(tmp_path: Path, text: str, name: str = "board-x") -> str:
    path = write_profile(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load_profile(name, search=[tmp_path])
    assert info.value.path == str(path)
    return str(info.value)


def test_an_unknown_field_is_refused(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace("disk_mb = 32", "disk_mb = 32\ndisk_gb = 1")
    assert "disk_gb" in _refused(tmp_path, text)


def test_an_unknown_top_level_field_is_refused(tmp_path: Path) -> None:
    text = 'colour = "red"\n' + GOOD_PROFILE.format(name="board-x")
    assert "colour" in _refused(tmp_path, text)


def test_a_wrong_type_names_the_key(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace("disk_mb = 32", 'disk_mb = "lots"')
    message = _refused(tmp_path, text)
    assert "budgets.disk_mb" in message


def test_a_wrong_type_in_a_sensor_names_its_index(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace('kind = "system"', 'kind = "system"\ninterval_s = "often"')
    assert "sensors[0].interval_s" in _refused(tmp_path, text)


def test_a_name_that_differs_from_the_file_name_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, GOOD_PROFILE.format(name="board-y"))
    assert "board-y" in message
    assert "board-x.toml" in message


def test_a_profile_without_sensors_is_refused(tmp_path: Path) -> None:
    text = 'name = "board-x"\ndescription = "d"\nsensors = []\n[budgets]\ndisk_mb = 1\n'
    assert "no sensors" in _refused(tmp_path, text)


def test_an_unknown_system_metric_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace('"load1"', '"load2"')
    message = _refused(tmp_path, text)
    assert "load2" in message
    assert "cpu_temp" in message


def test_metrics_on_a_non_system_sensor_are_refused(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace('kind = "system"', 'kind = "thermal"')
    assert "only for kind" in _refused(tmp_path, text)


def test_an_unknown_sensor_kind_is_refused(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace('kind = "system"', 'kind = "gps"')
    assert "sensors[0].kind" in _refused(tmp_path, text)


def test_command_allowed_without_commands_is_refused(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace('allowed = ["alert"]', 'allowed = ["alert", "command"]')
    assert "actuators.commands" in _refused(tmp_path, text)


def test_systemd_restart_allowed_without_units_is_refused(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace('allowed = ["alert"]', 'allowed = ["systemd_restart"]')
    assert "actuators.units" in _refused(tmp_path, text)


def test_an_empty_command_argv_is_refused(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace(
        'allowed = ["alert"]', 'allowed = ["command"]\ncommands = [["/bin/true"], []]'
    )
    assert "empty argv" in _refused(tmp_path, text)


def test_an_unknown_actuator_is_refused(tmp_path: Path) -> None:
    text = GOOD_PROFILE.format(name="board-x").replace('allowed = ["alert"]', 'allowed = ["reboot"]')
    assert "actuators.allowed" in _refused(tmp_path, text)


def test_invalid_toml_syntax_names_line_and_column(tmp_path: Path) -> None:
    text = 'name = "board-x"\ndescription = "d"\n[budgets\ndisk_mb = 1\n'
    message = _refused(tmp_path, text)
    assert "not valid TOML" in message
    assert "line 3" in message
    assert "column" in message


def test_a_missing_profile_lists_what_is_there(tmp_path: Path) -> None:
    write_profile(tmp_path, "board-x", GOOD_PROFILE.format(name="board-x"))
    with pytest.raises(ConfigError) as info:
        load_profile("board-z", search=[tmp_path])
    assert "board-z" in str(info.value)
    assert "board-x" in str(info.value)


@pytest.mark.parametrize("name", ["../sim", "sim/..", "", "a b"])
def test_a_profile_name_cannot_escape_the_profile_folders(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="not valid"):
        load_profile(name, search=[tmp_path])


def test_an_override_that_breaks_a_profile_rule_is_refused(tmp_path: Path) -> None:
    write_profile(tmp_path, "board-x", GOOD_PROFILE.format(name="board-x"))
    with pytest.raises(ConfigError, match=r"actuators\.commands"):
        load_profile("board-x", [(["actuators", "allowed"], ["command"])], search=[tmp_path])
