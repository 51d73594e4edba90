"""P5, enrollment variant: N devices enrolling from one image folder at once, against `edge-hub
provision` of N devices and their first connection, on one hub in the same run.

    .venv/bin/python bench/p5_enroll.py [--devices N] [--keep DIR]

1. `edge-hub init`, the HTTPS enrollment endpoint on ([enroll] port, default limits), then
   `edge-hub enroll create --profile sim` (one image folder) and N copies of it, each with a
   device-id file (what /etc/machine-id is on a board).
2. `edge-hub provision --profile sim` of N other devices in one call: timed.
3. `edge-hub run`; then `edge-agent simulate` on the N image copies: each agent makes its key
   (in a thread: the simulator is one process), enrolls over HTTPS, stores its certificate and
   connects. Timed from the command's start until hub.db shows all N online.
4. That fleet stops; `edge-agent simulate` on the N provisioned bundles: timed the same way.
5. Prints both, the enrollment endpoint's counts (rate limited, busy...) and a final JSON line.
Exit 0 (1 when the run broke: devices never online).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bridge_baseline import Child  # noqa: E402 - after the path fix above
from bench.p2_drain import AGENT, HUB, make_workdir, run_cli  # noqa: E402
from bench.p5_fleet import FLEET_SETS, SPEC_DEVICES, HubDb, wait_count  # noqa: E402
from tests.support.net import free_port  # noqa: E402

START_TIMEOUT: Final = 30.0  # hub + broker start on a loaded 2-core machine
ONLINE_TIMEOUT: Final = 900.0  # N keys, N enrollments and N TLS connections in one process: far beyond a MISS
FLEET_STOP_TIMEOUT: Final = 120.0
ENROLL_SETS: Final = ('enroll.device_id_source="file"', 'enroll.device_id_file="device-id"')


async def fleet_online(name: str, bundles: Path, devices: int, db: HubDb, sets: list[str]) -> dict[str, Any]:
    """`edge-agent simulate` on `bundles` until all online at the hub; then stopped."""
    argv = [a for s in (*FLEET_SETS, *sets) for a in ("--set", s)]
    since = time.time()
    fleet = await Child(name, [AGENT, "simulate", "--bundles", str(bundles), "--count", str(devices), "--every",
                               "5", *argv]).start(merge=True)
    try:
        all_s, marks = await wait_count(f"{name} online", lambda: db.online_since(since), devices, ONLINE_TIMEOUT)
    finally:
        code = await fleet.stop(within=FLEET_STOP_TIMEOUT)
    return {"all_s": all_s, **marks, "exit": code}


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    hub_dir, image, boards, bundles = work / "hub", work / "image", work / "boards", work / "bundles"
    result: dict[str, Any] = {}
    await run_cli(HUB, "init", "--dir", str(hub_dir), "--region", "p5", "--port", str(free_port()),
                  "--host", "127.0.0.1")
    config = hub_dir / "hub.toml"
    text = re.sub(r"(?m)^port = 9464\b", "port = 0", config.read_text())  # no metrics endpoint
    head, _, tail = text.partition("[enroll]")
    config.write_text(head + "[enroll]" + re.sub(r"(?m)^port = 0\b", f"port = {free_port()}", tail, count=1))
    await run_cli(HUB, "enroll", "create", "--dir", str(hub_dir), "--out", str(image), "--profile", "sim")
    for n in range(1, args.devices + 1):
        folder = boards / f"e{n:05d}"
        shutil.copytree(image, folder)
        (folder / "device-id").write_text(f"e{n:05d}\n")
    bundles.mkdir(mode=0o700)
    began = time.monotonic()
    await run_cli(HUB, "provision", "--dir", str(hub_dir), "--out", str(bundles), "--profile", "sim",
                  *(f"p{n:05d}" for n in range(1, args.devices + 1)), within=900.0)
    result["provision_s"] = round(time.monotonic() - began, 2)
    print(f"provisioned {args.devices} devices (edge-hub provision, one call) in {result['provision_s']} s")

    hub = await Child("hub", [HUB, "run", "--dir", str(hub_dir)]).start()
    db: HubDb | None = None
    try:
        await hub.wait_for(r"enrollment at https://", within=START_TIMEOUT)
        await hub.wait_for(r"hub ready", within=START_TIMEOUT)
        db = HubDb(hub_dir)
        result["enroll"] = await fleet_online("enrolling fleet", boards, args.devices, db, list(ENROLL_SETS))
        e = result["enroll"]
        print(f"enrollment: all {args.devices} enrolled and online {e['all_s']} s after `edge-agent simulate` "
              f"started (first {e.get('first')} s, half {e.get('p50')} s, 90 % {e.get('p90')} s)")
        if e["all_s"] is None:
            raise RuntimeError("not every device enrolled")
        await asyncio.sleep(6.0)  # the endpoint flushes its counts every 5 s
        result["enroll_counts"] = {outcome: db.scalar("SELECT COALESCE(SUM(count), 0) FROM enroll_counts "
                                                      "WHERE outcome = ?", (outcome,))
                                   for outcome in ("issued", "rate_limited", "busy", "tls_failed", "incomplete")}
        print(f"  enrollment endpoint: {result['enroll_counts']}")
        result["provisioned"] = await fleet_online("provisioned fleet", bundles, args.devices, db, [])
        p = result["provisioned"]
        print(f"provisioned: all {args.devices} online {p['all_s']} s after `edge-agent simulate` started "
              f"(first {p.get('first')} s, half {p.get('p50')} s, 90 % {p.get('p90')} s)")
        if p["all_s"] is None:
            raise RuntimeError("not every provisioned device connected")
    finally:
        if db is not None:
            db.close()
        await hub.stop(within=30.0)
        if args.keep:
            (work / "hub.log").write_text("\n".join(line for _, line in hub.lines) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=SPEC_DEVICES, help=f"devices (default {SPEC_DEVICES})")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="make the work directory inside DIR and keep it")
    args = parser.parse_args(argv)
    if not 1 <= args.devices <= 99_999:
        parser.error("--devices must be 1..99999")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    work = make_workdir("p5-enroll-", args.keep)
    print(f"P5 enrollment: {args.devices:,} devices from one image folder vs {args.devices:,} provisioned; "
          f"work dir {work}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    result: dict[str, Any] = {"bench": "p5_enroll", "devices": args.devices}
    try:
        result.update(asyncio.run(run(args, work)))
        e, p = result["enroll"]["all_s"], result["provisioned"]["all_s"]
        result["provision_total_s"] = round(result["provision_s"] + p, 2)
        print(f"from one image: {e} s until all online; by provisioning: {result['provision_s']} s to provision "
              f"+ {p} s to connect = {result['provision_total_s']} s (and a copy to each board by hand)")
    except (RuntimeError, TimeoutError) as exc:
        result["broke"] = f"{type(exc).__name__}: {exc}"
        print(f"the run broke: {result['broke']}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 1 if "broke" in result else 0


if __name__ == "__main__":
    sys.exit(main())
