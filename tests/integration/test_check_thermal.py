"""`edge-agent check` on a board whose profile reads thermal zones: none found is a finding, not
"all is well" (real hub, real agent CLI; the zones' folder is pointed at a tree made here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_check import check
from tests.support.harness import HubDir, Proc

pytestmark = pytest.mark.integration


def sensors_under(root: Path) -> str:
    """--set for rpi-4's own sensors, with the thermal zones looked for under `root`."""
    return f'sensors=[{{kind="system", interval_s=5.0}}, {{kind="thermal", interval_s=5.0, root="{root}"}}]'


async def test_an_rpi4_without_thermal_zones_is_told_so(hub_dir: HubDir, hub: Proc, bundles: Path,
                                                        workdir: Path) -> None:
    await hub_dir.provision(bundles, "dev-hot", profile="rpi-4")
    config = bundles / "dev-hot" / "agent.toml"
    empty = workdir / "sys-class-thermal"
    empty.mkdir()
    report = await check(config, sensors_under(empty))
    assert report.code == 1, report
    assert report.failed() == {"thermal"}, report  # the rest of the device is fine, and was still checked
    message = report.fail("thermal")
    assert f"profile 'rpi-4' expects thermal zones but {empty} has none" in message
    assert message.count(". ") == 0, message  # one sentence
    assert report.findings["broker"][0], report

    zone = empty / "thermal_zone0"
    zone.mkdir()
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("48312\n")
    report = await check(config, sensors_under(empty))
    assert report.code == 0, report
    assert report.findings["thermal"] == (True, f"1 thermal zone(s) under {empty}: thermal_cpu_thermal 48.312 °C.")

    # A profile without a thermal sensor has nothing to say about zones.
    report = await check(config, 'sensors=[{kind="system", interval_s=5.0}]')
    assert report.code == 0, report
    assert "thermal" not in report.findings
