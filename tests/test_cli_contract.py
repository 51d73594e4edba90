"""The operator's CLI keeps its contract where a careless operator would find the gaps: an
unknown device is a usage error (exit 2, one sentence), not an empty listing that looks fine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import HUB, HubDir, run_cli

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
