"""A fleet of mixed profiles gets one policy per profile at once: rollouts to disjoint devices run
side by side, one that would overlap is refused, and `--target site=a --target site=b` reaches
both sites (real hub and Mosquitto, real agents of two profiles, the operator's CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_policy_rollout import cli, fleet, good_policy, push, ranked, reported, status, wait_applied
from tests.support.harness import HUB, HubDir, Proc, run_cli

pytestmark = pytest.mark.integration

# rpi-4 has system metrics and no `record`; an info alert is harmless and fires once.
PI_POLICY = ('\n[[rules]]\nname = "on-pi"\nwhen = "cpu_percent > -1"\nclear = "cpu_percent < -2"\n'
             'offline = "act"\naction = "alert"\nargs = { message = "policy on", severity = "info" }\n')
NO_RULES = "[limits]\nmax_actions_per_hour = 10\n"  # fits every profile


async def test_rollouts_per_profile_run_side_by_side(hub_dir: HubDir, hub: Proc, bundles: Path,
                                                     workdir: Path) -> None:
    sims, pis = ["dev-s1", "dev-s2"], ["dev-q1", "dev-q2"]
    await hub_dir.provision(bundles, *sims, extra=("--tag", "site=a"))
    await hub_dir.provision(bundles, *pis, profile="rpi-4", extra=("--tag", "site=b"))
    async with fleet(bundles, *sims, *pis) as agents:
        v1, r1 = await push(hub_dir, workdir, good_policy("on-sim"), "--target", "profile=sim", "--canary", "50",
                            "--bake", "10m")
        v2, r2 = await push(hub_dir, workdir, PI_POLICY, "--target", "profile=rpi-4", "--canary", "50",
                            "--bake", "10m")
        await wait_applied({ranked(sims)[0]: agents[ranked(sims)[0]]}, v1)
        await wait_applied({ranked(pis)[0]: agents[ranked(pis)[0]]}, v2)
        st = await status(hub_dir)
        assert [(x["rollout"], x["version"], x["health"]["reached"]) for x in st["in_progress"]] == [
            (r1, v1, 1), (r2, v2, 1)]
        region = json.loads(await cli(hub_dir, "status", "--json"))
        assert [x["rollout"] for x in region["rollouts_in_progress"]] == [r1, r2]
        assert (f"policy rollouts in progress side by side: {r1} (version {v1} to profile=sim); "
                f"{r2} (version {v2} to profile=rpi-4)") in await cli(hub_dir, "status")

        # A push that would reach a device of either rollout in progress is refused, in one sentence.
        path = workdir / "overlap.toml"
        path.write_text(NO_RULES)
        code, out, err = await run_cli(HUB, "policy", "push", "--dir", str(hub_dir.dir), str(path),
                                       "--target", "site=b", "--target", "site=a")
        assert (code, out) == (1, ""), err
        assert len(err.strip().splitlines()) == 1, err
        assert f"rollout {r1} (version {v1}) is still in progress on {', '.join(sorted(sims))}" in err

        # Which rollout to promote must be said; each then reaches its own profile's devices.
        code, _, err = await run_cli(HUB, "policy", "promote", "--dir", str(hub_dir.dir))
        assert code == 2, err
        assert f"rollouts {r1}, {r2} are in progress side by side" in err
        for rollout_id in (r2, r1):
            await cli(hub_dir, "policy", "promote", "--rollout", str(rollout_id))
        await wait_applied({d: agents[d] for d in sims}, v1)
        await wait_applied({d: agents[d] for d in pis}, v2)
        await reported(hub_dir, {**dict.fromkeys(sims, v1), **dict.fromkeys(pis, v2)})

        # The same key twice is "any of": both sites, not just the last one named.
        marks = {d: a.mark() for d, a in agents.items()}
        code, out, err = await run_cli(HUB, "policy", "push", "--dir", str(hub_dir.dir), str(path),
                                       "--target", "site=b", "--target", "site=a")
        assert code == 0, err
        assert "4 of 4 targeted device(s)" in out, out
        v3 = v2 + 1
        await wait_applied(agents, v3, marks)
        st = await status(hub_dir)
        assert st["rollouts"][0]["target"] == "site=a|b"
