"""`edge-hub enroll create|list|revoke|readmit`: bootstrap credentials for golden images (docs/enrollment.md)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from edgefleet.runtime.settings import duration_arg
from hub.cli.format import when
from hub.config import load_hub

EXIT_OK = 0


def _expires(text: str) -> float:
    """--expires: a duration (30m, 12h, 90s) or days (7d)."""
    days = re.fullmatch(r"(\d+(?:\.\d+)?)d", text.strip())
    return float(days[1]) * 86400 if days else duration_arg(text)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


def add_parsers(sub: Any, dir_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    enroll = sub.add_parser(
        "enroll", help="zero-touch enrollment: image folders whose devices enroll themselves",
        description="An enrollment is a bootstrap credential for one golden image: every board flashed with its "
                    "folder makes its own key on first start and asks the hub (over HTTPS, [enroll] port in "
                    "hub.toml) for its own certificate. The credential can do nothing else (docs/enrollment.md).")
    cmds = enroll.add_subparsers(dest="enroll_command", required=True, metavar="SUBCOMMAND")
    create = cmds.add_parser(
        "create", help="make an enrollment and write its image folder",
        description="Write FOLDER with agent.toml, ca.crt, policy.pub and enroll.token (mode 0600), the same for "
                    "every board; copy it to /etc/edge-agent/ in the image. Nothing in it is device-specific.")
    dir_arg(create)
    create.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="a new or empty folder")
    create.add_argument("--profile", default="generic-linux", help="firmware profile of the devices (default "
                                                                   "generic-linux)")
    create.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="tag every device it enrolls (repeatable)")
    create.add_argument("--max-devices", type=_count, metavar="N", help="enroll at most N devices (default: no limit)")
    create.add_argument("--expires", type=_expires, metavar="DURATION",
                        help="refuse enrollments after this long, e.g. 30m, 12h, 14d (default: never)")
    create.add_argument("--approve", action="store_true",
                        help="hold every request until `edge-hub approvals approve ID` (or deny)")
    lst = cmds.add_parser("list", help="enrollments with their limits and the devices they enrolled")
    dir_arg(lst)
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = cmds.add_parser("revoke", help="stop an enrollment: no new devices; enrolled ones keep running")
    dir_arg(revoke)
    revoke.add_argument("id", metavar="ID")
    readmit = cmds.add_parser(
        "readmit", help="let an enrolled (or revoked) device id enroll once more with a new key",
        description="For a replaced or re-flashed board: its next enrollment is accepted with a new key, and the "
                    "old certificates of that id are revoked then.")
    dir_arg(readmit)
    readmit.add_argument("device", metavar="DEVICE_ID")


async def run(args: argparse.Namespace) -> int:
    from hub.db import enrollments
    from hub.db.engines import open_store
    from hub.pki import enroll
    from hub.pki.provision import parse_tags
    from hub.rollout.rollouts import operator_name

    paths, config = load_hub(args.dir)
    spec = None
    if args.enroll_command == "create":
        spec = enroll.ImageSpec(args.profile, parse_tags(args.tag), args.max_devices,
                                None if args.expires is None else time.time() + args.expires, args.approve)
        enroll.check_profile(spec.profile)  # before the database is touched
    store = await open_store(config.database.url, paths.db)
    try:
        if spec is not None:
            row = await enroll.create_enrollment(paths, config, store, args.out.resolve(), spec, operator_name())
            print(f"enrollment {row.id} created; image folder in {args.out}")
            print(f"  copy it unchanged to /etc/edge-agent/ on every board; devices enroll at "
                  f"https://{config.broker.host}:{config.enroll.port} (edge-hub run must be running)")
            limits = [f"at most {row.max_devices} device(s)" if row.max_devices else "",
                      f"until {when(row.expires_at)}" if row.expires_at else "",
                      "each held for edge-hub approvals approve" if row.approve else ""]
            print("  " + ("; ".join(x for x in limits if x) or "no limits: revoke it when the rollout is done"))
            return EXIT_OK
        if args.enroll_command == "list":
            rows = await store.atomically(enrollments.list_enrollments)
            if args.json:
                for r in rows:
                    sys.stdout.write(msgspec.json.encode(r).decode() + "\n")
            else:
                print("\n".join(map(_line, rows)) if rows else "no enrollments")
            return EXIT_OK
        if args.enroll_command == "revoke":
            print(await enroll.revoke_enrollment(config, store, args.id, operator_name()))
            return EXIT_OK
        print(await enroll.readmit_device(config, store, args.device, operator_name()))
        return EXIT_OK
    finally:
        await store.close()


def _line(r: Any) -> str:
    now = time.time()
    if r.revoked_at is not None:
        state = f"revoked {when(r.revoked_at)}"
    elif r.expires_at is not None and r.expires_at <= now:
        state = f"expired {when(r.expires_at)}"
    elif r.max_devices is not None and r.enrolled >= r.max_devices:
        state = "used up"
    else:
        state = "active" + (f" until {when(r.expires_at)}" if r.expires_at else "")
    limit = f"/{r.max_devices}" if r.max_devices is not None else ""
    tags = ",".join(f"{k}={v}" for k, v in sorted(r.tags.items())) or "-"
    held = f", {r.pending} pending approval" if r.pending else (" (approval)" if r.approve else "")
    return f"{r.id}  {state}  profile {r.profile}  tags {tags}  enrolled {r.enrolled}{limit}{held}"
