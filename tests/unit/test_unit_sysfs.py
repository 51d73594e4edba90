"""Kernel sensors against a sysfs tree laid out as the kernel documents it (devices under
/sys/devices, the class and bus folders holding symlinks to them)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from edge_agent.sense.field.base import FieldContext, FieldSensors
from edge_agent.sense.field.sysfs import SysfsSensor, build, point_name
from edge_agent.sense.sensors import Reading, SensorError
from edgefleet.policy.field import SysfsSensorSpec
from edgefleet.wire.events import EventKind
from tests.support.field import Collected, wait_until

NOW = 1_700_000_000.0


def read(sensor: SysfsSensor, rejected: list[str] | None = None) -> list[Reading]:
    return sensor.read(NOW, (rejected if rejected is not None else []).append)


def _device(sys: Path, device_path: str, link_dir: str, link_name: str, attrs: dict[str, str]) -> Path:
    """Make /sys/devices/<device_path> with `attrs`, linked from /sys/<link_dir>/<link_name>."""
    real = sys / "devices" / device_path
    real.mkdir(parents=True)
    for name, text in attrs.items():
        (real / name).write_text(text)
    links = sys / link_dir
    links.mkdir(parents=True, exist_ok=True)
    (links / link_name).symlink_to(os.path.relpath(real, links))
    return real


W1_GOOD = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"
W1_BAD_CRC = "72 01 4b 46 7f ff 0e 10 57 : crc=57 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"


def test_w1_slave_file_gives_degrees_and_a_failed_crc_is_a_counted_bad_read(tmp_path: Path) -> None:
    slave = _device(tmp_path, "w1_bus_master1/28-0316a2795aff", "bus/w1/devices", "28-0316a2795aff",
                    {"w1_slave": W1_GOOD, "name": "28-0316a2795aff"})
    sensor = SysfsSensor("tank", "w1", "28-0316a2795aff", root=tmp_path)
    assert read(sensor) == [("tank.temperature", NOW, pytest.approx(23.125))]
    (slave / "w1_slave").write_text(W1_BAD_CRC)
    rejected: list[str] = []
    with pytest.raises(SensorError, match="CRC"):
        read(sensor, rejected)
    assert len(rejected) == 1
    assert "the 1-Wire CRC check failed" in rejected[0]
    (slave / "w1_slave").write_text(W1_GOOD.replace("t=23125", "t=-1500"))
    assert read(sensor)[0].value == pytest.approx(-1.5)


def test_w1_temperature_file_of_newer_kernels_is_preferred(tmp_path: Path) -> None:
    _device(tmp_path, "w1_bus_master1/28-00000abc", "bus/w1/devices", "28-00000abc",
            {"w1_slave": W1_BAD_CRC, "temperature": "21500\n"})
    assert read(SysfsSensor("t", "w1", "28-00000abc", root=tmp_path))[0].value == pytest.approx(21.5)


def test_missing_w1_device_names_what_is_there(tmp_path: Path) -> None:
    _device(tmp_path, "w1_bus_master1/28-1", "bus/w1/devices", "28-1", {"temperature": "1000"})
    with pytest.raises(SensorError, match=r"no 1-Wire device '28-2' .*found: 28-1"):
        read(SysfsSensor("t", "w1", "28-2", root=tmp_path))


def _hwmon_tree(sys: Path) -> Path:
    _device(sys, "virtual/thermal/cpu", "class/hwmon", "hwmon0", {"name": "cpu_thermal\n", "temp1_input": "48000\n"})
    return _device(sys, "platform/soc/1-0044/hwmon/hwmon1", "class/hwmon", "hwmon1", {
        "name": "sht3x\n",
        "temp1_input": "21375\n",
        "humidity1_input": "45250\n",
        "in0_input": "3300\n", "in0_label": "vdd 3v3\n",
        "curr1_input": "1500\n",
        "power1_input": "2500000\n",
        "fan1_input": "1200\n",
        "temp1_max": "60000\n",  # not an input: ignored
    })


def test_hwmon_device_by_name_in_documented_units_with_labels(tmp_path: Path) -> None:
    _hwmon_tree(tmp_path)
    readings = {r.metric: r.value for r in read(SysfsSensor("room", "hwmon", "sht3x", root=tmp_path))}
    assert readings == {
        "room.temp1": pytest.approx(21.375),  # m°C -> °C
        "room.humidity1": pytest.approx(45.25),  # m%RH -> %RH
        "room.vdd_3v3": pytest.approx(3.3),  # mV -> V, named by its label
        "room.curr1": pytest.approx(1.5),  # mA -> A
        "room.power1": pytest.approx(2.5),  # µW -> W
        "room.fan1": pytest.approx(1200.0),  # RPM
    }


def test_hwmon_attributes_in_the_device_folder_of_old_drivers(tmp_path: Path) -> None:
    hwmon = _device(tmp_path, "platform/it87/hwmon/hwmon0", "class/hwmon", "hwmon0", {"name": "it87"})
    (hwmon / "device").mkdir()
    (hwmon / "device" / "temp2_input").write_text("30000")
    (hwmon / "device" / "temp10_input").write_text("31000")
    readings = read(SysfsSensor("board", "hwmon", "it87", root=tmp_path))
    assert [(r.metric, r.value) for r in readings] == [("board.temp2", 30.0), ("board.temp10", 31.0)]


def test_one_unreadable_channel_is_a_bad_read_the_others_still_report(tmp_path: Path) -> None:
    hwmon = _hwmon_tree(tmp_path)
    (hwmon / "humidity1_input").unlink()
    (hwmon / "humidity1_input").mkdir()  # reading it fails with an OSError, as EINVAL would
    (hwmon / "fan1_input").write_text("stalled\n")
    rejected: list[str] = []
    first = {r.metric for r in read(SysfsSensor("room", "hwmon", "sht3x", root=tmp_path), rejected)}
    assert "room.temp1" in first
    assert "room.humidity1" not in first
    assert "room.fan1" not in first
    assert len(rejected) == 2
    assert rejected[0].endswith("fan1_input: it holds b'stalled', not a number")
    assert rejected[1].endswith("humidity1_input: Is a directory")


async def test_running_sensor_reports_health_and_recovers_when_the_device_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    hwmon = _hwmon_tree(tmp_path)
    (hwmon / "fan1_input").write_text("stalled\n")
    spec = SysfsSensorSpec(name="room", source="hwmon", device="sht3x", root=str(tmp_path), channels=["temp1", "fan1"],
                           interval_s=0.05)
    events: list[tuple[str, dict[str, object]]] = []
    sink = Collected()
    field = FieldSensors(build([spec], FieldContext()), sink, lambda kind, body: events.append((kind, body)))
    health = field.health["room"]
    task = asyncio.create_task(field.run())
    try:
        with caplog.at_level(logging.DEBUG):
            await sink.until(3)
            assert {r.metric for r in sink.readings} == {"room.temp1"}
            assert health.state == "ok"
            assert health.rejected >= 3  # the fan's every read, logged once at WARNING
            assert len([r for r in caplog.records if "skipped a value" in r.getMessage()
                        and r.levelno == logging.WARNING]) == 1
            link = tmp_path / "class/hwmon/hwmon1"
            target = link.readlink()
            link.unlink()  # the driver is unloaded
            await wait_until(lambda: health.state == "failing", "the sensor is failing")
            link.symlink_to(target)
            await wait_until(lambda: health.state == "ok", "the sensor recovers")
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert [kind for kind, _ in events] == [EventKind.SENSOR_FAILING, EventKind.SENSOR_RECOVERED]


def test_points_select_channels_and_an_unknown_point_says_what_exists(tmp_path: Path) -> None:
    _hwmon_tree(tmp_path)
    sensor = SysfsSensor("room", "hwmon", "sht3x", root=tmp_path, points=["temp1"])
    assert [r.metric for r in read(sensor)] == ["room.temp1"]
    with pytest.raises(SensorError, match=r"no channel temp9; it has: curr1, fan1, humidity1, vdd_3v3, power1, temp1"):
        read(SysfsSensor("room", "hwmon", "sht3x", root=tmp_path, points=["temp9"]))


def test_missing_hwmon_device_names_the_devices_found(tmp_path: Path) -> None:
    _hwmon_tree(tmp_path)
    with pytest.raises(SensorError, match=r"no hwmon device named 'bme280' .*found: cpu_thermal, sht3x"):
        read(SysfsSensor("x", "hwmon", "bme280", root=tmp_path))


def _bme280(sys: Path) -> Path:
    return _device(sys, "platform/soc/i2c-1/1-0076/iio:device0", "bus/iio/devices", "iio:device0", {
        "name": "bme280\n",
        "in_temp_input": "25730\n",  # m°C
        "in_pressure_input": "101.325000\n",  # kPa
        "in_humidityrelative_input": "48560\n",  # m%
        "in_temp_oversampling_ratio": "2\n",
    })


def test_iio_processed_values_in_our_units(tmp_path: Path) -> None:
    _bme280(tmp_path)
    readings = {r.metric: r.value for r in read(SysfsSensor("air", "iio", "bme280", root=tmp_path))}
    assert readings == {
        "air.temp": pytest.approx(25.73),
        "air.pressure": pytest.approx(1013.25),  # kPa -> hPa
        "air.humidityrelative": pytest.approx(48.56),
    }


def test_iio_raw_with_own_and_shared_scale_and_offset(tmp_path: Path) -> None:
    _device(tmp_path, "platform/soc/i2c-1/1-0048/iio:device1", "bus/iio/devices", "iio:device1", {
        "name": "ads1115\n",
        "in_voltage0_raw": "16000\n",
        "in_voltage1_raw": "-800\n",
        "in_voltage1_scale": "0.250000\n",  # its own scale wins over the shared one
        "in_voltage_scale": "0.125000\n",  # shared: mV per count
        "in_voltage0-voltage1_raw": "5\n",  # differential: skipped
    })
    _device(tmp_path, "platform/soc/i2c-1/1-0040/iio:device2", "bus/iio/devices", "iio:device2", {
        "name": "si7020\n",
        "in_temp_raw": "26000\n",
        "in_temp_offset": "-4368\n",
        "in_temp_scale": "2.681\n",  # (raw + offset) * scale is in m°C
        "in_humidityrelative_raw": "30000\n",
        "in_humidityrelative_scale": "1.907\n",
        "in_humidityrelative_offset": "-3146\n",
    })
    adc = {r.metric: r.value for r in read(SysfsSensor("adc", "iio", "ads1115", root=tmp_path))}
    assert adc == {"adc.voltage0": pytest.approx(2.0), "adc.voltage1": pytest.approx(-0.2)}
    rh = {r.metric: r.value for r in read(SysfsSensor("rh", "iio", "si7020", root=tmp_path))}
    assert rh == {
        "rh.temp": pytest.approx((26000 - 4368) * 2.681 / 1000),
        "rh.humidityrelative": pytest.approx((30000 - 3146) * 1.907 / 1000),
    }


def test_iio_input_wins_over_raw_and_modifiers_name_the_point(tmp_path: Path) -> None:
    _device(tmp_path, "platform/soc/i2c-1/1-005a/iio:device0", "bus/iio/devices", "iio:device0", {
        "name": "mlx90614\n",
        "in_temp_object_raw": "15000\n", "in_temp_object_scale": "20\n", "in_temp_object_offset": "-13657.5\n",
        "in_temp_ambient_raw": "14000\n", "in_temp_ambient_input": "22000\n",
    })
    readings = {r.metric: r.value for r in read(SysfsSensor("ir", "iio", "mlx90614", root=tmp_path))}
    assert readings == {"ir.temp_ambient": pytest.approx(22.0), "ir.temp_object": pytest.approx(26.85)}


def test_a_device_that_vanished_is_looked_up_again(tmp_path: Path) -> None:
    real = _bme280(tmp_path)
    sensor = SysfsSensor("air", "iio", "bme280", root=tmp_path)
    assert len(read(sensor)) == 3
    # The driver is reloaded: the device comes back under another number.
    (tmp_path / "bus/iio/devices/iio:device0").unlink()
    with pytest.raises(SensorError, match="no channel"):
        read(sensor)
    (tmp_path / "bus/iio/devices/iio:device3").symlink_to(real)
    assert len(read(sensor)) == 3


def test_point_names_from_labels() -> None:
    assert point_name("Core 0") == "Core_0"
    assert point_name("in0-vdd") == "in0_vdd"
    assert point_name("  ") == "x"
