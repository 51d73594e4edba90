"""The operator's CLI keeps its contract where a careless operator would find the gaps: an
unknown device is a usage error (exit 2, one sentence), not an empty listing that looks fine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.harness import AGENT, HUB, HubDir, run_cli
from tests.unit.test_unit_allowlists import RESTART_COLLECTOR

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("command", ["events", "telemetry"])
async def test_an_unknown_device_is_a_usage_error_not_an_empty_listing(hub_dir: HubDir, bundles: Path,
                                                                       command: str) -> None:
    await hub_dir.provision(bundles, "dev-k1")
    for extra in ((), ("--json",)):
        # A typo of a real id, as an operator makes it.
        code, out, err = await run_cli(HUB, command, "--dir", str(hub_dir.dir), "--device", "dev-kl", *extra)
        assert code == 2, (code, out, err)
        assert out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert "'dev-kl'" in err
        assert "edge-hub devices" in err
        assert "Traceback" not in err

    # A registered device without records, and the hub's own identity, are known: empty, exit 0.
    for device in ("dev-k1", f"hub.{hub_dir.region}"):
        code, out, err = await run_cli(HUB, command, "--dir", str(hub_dir.dir), "--device", device, "--json")
        assert code == 0, err
        assert out == ""


REFUSED_UNIT = ("rule 'restart-collector': its systemd_restart action would be refused on profile 'rpi-4': "
                "systemd unit 'edge-collector.service' is not allowed by this profile; allowed units: "
                "edge-app.service")


async def test_validate_push_and_the_agent_refuse_a_unit_outside_the_allowlist(hub_dir: HubDir, bundles: Path,
                                                                              workdir: Path) -> None:
    """The restart would be refused each time the rule fired; it is refused before anything is signed."""
    await hub_dir.provision(bundles, "dev-r4", profile="rpi-4")
    path = workdir / "restart.toml"
    path.write_text(RESTART_COLLECTOR)
    for where in (("--profile", "rpi-4"), ("--dir", str(hub_dir.dir))):
        code, out, err = await run_cli(HUB, "policy", "validate", str(path), *where)
        assert (code, out) == (2, ""), err
        assert f"{path}:1:1: {REFUSED_UNIT} [profile rpi-4]" in err

    code, out, err = await run_cli(HUB, "policy", "push", "--dir", str(hub_dir.dir), str(path))
    assert (code, out) == (2, ""), err
    assert REFUSED_UNIT in err
    code, out, err = await run_cli(HUB, "policy", "status", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    assert json.loads(out)["rollouts"] == []

    # The agent itself refuses the same file as its local policy, with the same sentence.
    bundle = bundles / "dev-r4"
    (bundle / "policy.toml").write_text(RESTART_COLLECTOR)
    config = bundle / "agent.toml"
    config.write_text('policy = "policy.toml"\n' + config.read_text())
    code, out, err = await run_cli(AGENT, "check", "--config", str(config))
    assert code == 2, (out, err)
    assert REFUSED_UNIT in err

    path.write_text(RESTART_COLLECTOR.replace("edge-collector.service", "edge-app.service"))
    code, out, err = await run_cli(HUB, "policy", "validate", str(path), "--dir", str(hub_dir.dir))
    assert (code, err) == (0, ""), err
