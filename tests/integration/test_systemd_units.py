"""The systemd units and the Mosquitto snippet for Debian's mosquitto.service.

`systemd-analyze verify` checks the units (scripts/test.sh installs systemd when it is
missing); it wants ExecStart's binary to exist, so the unit is verified from a copy whose
/opt/edgefleet/bin/ is this venv's bin/ — the only difference from the file we ship.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
from pathlib import Path

import pytest

from edgefleet.runtime.files import write_atomic
from hub.broker import broker_executable, render_conf
from hub.config import HubConfig, HubPaths
from tests.support.harness import BIN, HUB, HubDir, Proc, run_cli, start_agent

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ("edge-agent.service", "edge-hub.service")
SNIPPET = SYSTEMD_DIR / "mosquitto-edgefleet.conf"
INSTALL_BIN = "/opt/edgefleet/bin/"  # the venv of docs/operations.md
VERIFY_TIMEOUT = 60.0


def unit_settings(name: str) -> dict[str, str]:
    """Key -> value of a unit file (the last one wins, as in systemd; no key is repeated in ours)."""
    settings: dict[str, str] = {}
    for line in (SYSTEMD_DIR / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def exec_start(name: str, replace: dict[str, str]) -> list[str]:
    """The unit's ExecStart as argv, with installed paths replaced by test ones."""
    command = unit_settings(name)["ExecStart"]
    for old, new in replace.items():
        command = command.replace(old, new)
    return shlex.split(command)


def mosquitto_settings(text: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))


@pytest.mark.parametrize("name", UNITS)
async def test_units_pass_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: apt-get install systemd (scripts/test.sh does it)")
    copy = tmp_path / name
    copy.write_text((SYSTEMD_DIR / name).read_text().replace(INSTALL_BIN, f"{BIN}/"))
    code, out, err = await run_cli(analyze, "verify", "--man=no", str(copy), timeout=VERIFY_TIMEOUT)
    # verify exits 0 on an unknown key or a value it cannot parse: it only says so.
    about_ours = [line for line in (out + err).splitlines() if name in line]
    assert code == 0, out + err
    assert not about_ours, "\n".join(about_ours)


@pytest.mark.parametrize("name", UNITS)
def test_units_are_watched_restarted_and_confined(name: str) -> None:
    """What the units promise: systemd knows when the daemon is ready and restarts it when it
    fails or hangs; it runs unprivileged with a read-only system and a private /tmp."""
    unit = unit_settings(name)
    assert unit["Type"] == "notify"
    assert unit["NotifyAccess"] == "main"  # actuator commands and Mosquitto must not speak for us
    assert unit["Restart"] == "on-failure"  # which includes a watchdog timeout
    assert re.fullmatch(r"\d+(s|min)", unit["WatchdogSec"])
    assert unit["User"] not in ("", "root")
    assert unit["CapabilityBoundingSet"] == ""
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "SystemCallFilter": "@system-service"}.items():
        assert unit[key] == value, key
    assert set(unit["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_every_path_the_daemons_write_is_their_state_directory() -> None:
    """ProtectSystem=strict leaves only StateDirectory= writable: the agent's outbox and the hub
    directory must be exactly there, or the daemons fail at their first write."""
    agent, hub = unit_settings("edge-agent.service"), unit_settings("edge-hub.service")
    argv = exec_start("edge-agent.service", {})
    assert argv[argv.index("--set") + 1] == f"state.dir=/var/lib/{agent['StateDirectory']}"
    argv = exec_start("edge-hub.service", {})
    assert argv[argv.index("--dir") + 1] == f"/var/lib/{hub['StateDirectory']}"
    assert "ReadWritePaths" not in agent
    assert "ReadWritePaths" not in hub


def test_the_snippet_keeps_every_setting_of_the_managed_broker() -> None:
    """A setting added to render_conf must reach the snippet too (or be listed here as one that
    Debian's own mosquitto.conf or the file locations decide)."""
    managed = mosquitto_settings(render_conf(HubPaths(Path("/var/lib/edge-hub")), HubConfig(region="test"), None))
    snippet = mosquitto_settings(SNIPPET.read_text())
    paths_differ = {"acl_file", "cafile", "certfile", "keyfile", "listener"}
    debian_decides = {"persistence", "persistence_location", "autosave_interval", "user", "log_dest", "log_type"}
    assert set(managed) - set(snippet) <= debian_decides
    for key in set(managed) - paths_differ - debian_decides:
        assert snippet[key] == managed[key], key
    assert snippet["crlfile"] == managed["crlfile"]  # read live from the hub directory
    assert snippet["listener"] == "8883"  # every interface: devices dial it from the network


# --- Debian's mosquitto.service with the snippet, for real ----------------------------------

DEBIAN_MOSQUITTO_CONF = """\
# Debian's /etc/mosquitto/mosquitto.conf (bookworm), its paths moved into the test directory.
pid_file {run}/mosquitto.pid

persistence true
persistence_location {data}/

log_dest stderr

include_dir {conf_d}
"""


def _give_to_broker(*paths: Path) -> None:
    """Started as root, Mosquitto drops to 'mosquitto' before it reads its files (as under systemd)."""
    if os.geteuid() == 0:
        account = pwd.getpwnam("mosquitto")
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)


@pytest.mark.integration
async def test_debian_mosquitto_with_the_snippet_serves_the_fleet(hub_dir: HubDir, bundles: Path,
                                                                 workdir: Path) -> None:
    """Installed as its header says: devices get in, and revocation (a CRL the hub re-issues in
    its own directory, then a reload) locks one out and closes its session."""
    paths = HubPaths(hub_dir.dir.resolve())
    await hub_dir.provision(bundles, "dev-m")
    etc = workdir / "etc-mosquitto"
    certs, conf_d, run, data = etc / "edgefleet", etc / "conf.d", workdir / "run", workdir / "data"
    for directory in (etc, certs, conf_d, run, data):
        directory.mkdir(mode=0o755)
    for source in (paths.ca_cert, paths.server_cert, paths.acl):
        write_atomic(certs / source.name, source.read_bytes(), 0o644)
    write_atomic(certs / "server.key", paths.server_key.read_bytes(), 0o600)
    _give_to_broker(certs / "server.key", run, data)
    snippet = (SNIPPET.read_text()
               .replace("/etc/mosquitto/edgefleet/", f"{certs}/")
               .replace("/var/lib/edge-hub/", f"{paths.root}/")
               .replace("listener 8883", f"listener {hub_dir.port} 127.0.0.1"))
    (conf_d / "edgefleet.conf").write_text(snippet)
    main = etc / "mosquitto.conf"
    main.write_text(DEBIAN_MOSQUITTO_CONF.format(run=run, data=data, conf_d=conf_d))

    broker = await Proc("mosquitto", [broker_executable("mosquitto"), "-c", str(main)]).start()
    hub = agent = None
    try:
        await broker.wait_for(r"mosquitto version .* running")
        text = paths.config.read_text()
        text = text.replace('mode = "managed"', 'mode = "external"')
        text = text.replace("reload_command = []", f'reload_command = ["kill", "-HUP", "{broker.pid}"]')
        paths.config.write_text(text)
        hub = await Proc("hub", [HUB, "run", "--dir", str(hub_dir.dir)]).start()
        await hub.wait_for(r"hub ready")
        agent = await start_agent(bundles / "dev-m" / "agent.toml")
        await hub.wait_for(r"device dev-m is online")
        code, out, err = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), "dev-m")
        assert code == 0, err
        assert "session was closed" in out
        await hub.wait_for(r"device dev-m is offline", timeout=5)
        await agent.wait_for(r"revoked", timeout=10)
    finally:
        for proc in (agent, hub, broker):
            if proc is not None:
                await proc.stop()

