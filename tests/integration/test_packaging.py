"""Issue 15 item 19: what docs/operations.md tells an operator to take from the wheel is in the
wheel; a site's own firmware profiles are found before the built-in ones without editing
installed files; `edge-hub init` without --host says where the bundles will point.

The wheel is built from this checkout with pip, as docs/operations.md does, and run from its
extracted files, so nothing here can find the checkout's own copies by accident.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgefleet.policy.profiles import PROFILE_DIRS, SITE_PROFILE_DIR
from tests.support.harness import AGENT, HUB, HubDir, run_cli

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("edge-agent.service", "edge-hub.service", "mosquitto-edgefleet.conf")
BUILD_TIMEOUT = 300.0  # pip fetches the build backend when its cache has none


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, timeout=BUILD_TIMEOUT, capture_output=True)
    (built,) = out.glob("edgefleet-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's files, as an install would lay them out (no checkout beside them)."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def from_wheel(site: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *argv], env=env, cwd=site, capture_output=True, text=True, timeout=60,
                          check=False)


def test_the_wheel_ships_the_units_the_snippet_and_the_profiles(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for unit in UNITS:
        assert f"edge_agent/systemd/{unit}" in names
    for profile in (ROOT / "firmware_profiles").glob("*.toml"):
        assert f"edge_agent/firmware_profiles/{profile.name}" in names


def test_units_are_printed_and_installed_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    where = from_wheel(installed, "-c", "import edge_agent; print(edge_agent.__file__)")
    assert where.stdout.startswith(str(installed)), where  # the wheel's package, not the checkout's
    agent = from_wheel(installed, "-m", "edge_agent", "units")
    assert agent.returncode == 0, agent.stderr
    assert agent.stdout == (ROOT / "systemd" / "edge-agent.service").read_text()
    for unit in UNITS[1:]:
        hub = from_wheel(installed, "-m", "hub", "units", unit, "--install", str(tmp_path))
        assert hub.returncode == 0, hub.stderr
        assert (tmp_path / unit).read_bytes() == (ROOT / "systemd" / unit).read_bytes()
        assert f"installed {tmp_path / unit}; next:" in hub.stdout
    nowhere = from_wheel(installed, "-m", "hub", "units", "--install", str(tmp_path / "missing"))
    assert nowhere.returncode == 2
    assert nowhere.stderr.strip().count("\n") == 0, nowhere.stderr
    assert "is not a folder" in nowhere.stderr


def test_a_site_profile_is_searched_before_the_built_in_ones() -> None:
    assert PROFILE_DIRS[0] == SITE_PROFILE_DIR == Path("/etc/edge-agent/profiles")


SITE_PROFILE = """\
name = "{name}"
description = "{description}"
[budgets]
disk_mb = 16
[[sensors]]
kind = "sim"
interval_s = 1.0
"""


async def test_profiles_dir_in_agent_toml_comes_first(hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "pi-001")
    bundle = bundles / "pi-001"
    config = bundle / "agent.toml"
    text = config.read_text().replace('profile = "sim"', 'profile = "plant-board"')
    config.write_text(text)
    code, _, err = await run_cli(AGENT, "status", "--json", "--config", str(config))
    assert code == 2, err  # not found anywhere yet
    assert "no firmware profile 'plant-board'" in err
    (bundle / "site-profiles").mkdir()
    (bundle / "site-profiles" / "plant-board.toml").write_text(
        SITE_PROFILE.format(name="plant-board", description="the plant's own board"))
    config.write_text(text.replace("[tags]", 'profiles_dir = "site-profiles"\n\n[tags]'))
    code, out, err = await run_cli(AGENT, "status", "--json", "--config", str(config))
    assert code != 2, err
    assert json.loads(out)["profile"] == "plant-board"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a private /etc needs root and unshare")
def test_etc_edge_agent_profiles_replaces_a_built_in_one_without_editing_installed_files(
        tmp_path: Path) -> None:
    """In a private mount namespace /etc is an overlay, so the machine's /etc is never written."""
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    script = (
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc && "
        "mkdir -p /etc/edge-agent/profiles && cat > /etc/edge-agent/profiles/sim.toml && "
        f"{sys.executable} -c 'from edgefleet.policy.profiles import load_profile; "
        "print(load_profile(\"sim\").description)'"
    )
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          input=SITE_PROFILE.format(name="sim", description="the site's own sim"),
                          capture_output=True, text=True, timeout=60, check=False)
    if "overlay" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"no overlay mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "the site's own sim"
    assert not Path("/etc/edge-agent/profiles/sim.toml").exists()  # the machine's /etc was not written


async def test_init_without_host_says_bundles_point_at_loopback(workdir: Path) -> None:
    code, _, err = await run_cli(HUB, "init", "--dir", str(workdir / "a"), "--region", "r", "--port", "18883")
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("edge-hub: warning")]
    assert len(warning) == 1, err
    assert "127.0.0.1" in warning[0]
    assert "--host" in warning[0]
    code, _, err = await run_cli(HUB, "init", "--dir", str(workdir / "b"), "--region", "r", "--port", "18883",
                                 "--host", "hub.example.net")
    assert code == 0, err
    assert "warning" not in err
