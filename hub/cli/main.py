"""`edge-hub`: set up a hub, provision and revoke devices, run the hub, list the fleet."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from edgefleet import __version__
from edgefleet.runtime import logfmt
from edgefleet.runtime.files import database_access_denied, database_advice, permission_advice
from edgefleet.runtime.pipes import run_command
from edgefleet.runtime.units import HUB_UNITS, units_command
from hub.cli import coordination as coordination_commands
from hub.cli import enroll as enroll_commands
from hub.cli import export as export_command
from hub.cli import policy as policy_commands
from hub.cli.format import MOMENT_HELP, event_detail, moment, when
from hub.config import DEFAULT_PORT, HubPaths, load_hub
from hub.db.engines import open_store
from hub.db.interface import StoreUnavailable
from hub.errors import HubAlreadyRunning, HubError, UsageError

if TYPE_CHECKING:
    from hub.db.interface import HubState
    from hub.db.rows import DeviceRow, EventRow, TelemetryRow
    from hub.rollout.rollouts import Admission

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
LOOPBACK_HOST = "127.0.0.1"  # init's broker host without --host: enough for a demo on one machine


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, required=True, metavar="DIR",
                   help="the hub directory made by `edge-hub init`")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-hub",
        description="edgefleet regional hub: fleet PKI, managed Mosquitto with mutual TLS, "
                    "device registry, and the operator's commands.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error. "
               "Listings take --json: one JSON object per line (fields in docs/cli.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init", help="create a hub: fleet CA, keys, broker config, hub.toml",
        description="Create DIR with the fleet CA (ECDSA P-256), a separate Ed25519 policy-signing key, "
                    "the broker's server certificate, the hub's client certificate (DIR/pki/hub.crt, "
                    "hub.key), an empty CRL, the Mosquitto config and ACL, and DIR/hub.toml. Private "
                    "keys are mode 0600. Refuses to touch an existing hub unless --force.")
    _dir_arg(init)
    init.add_argument("--region", required=True, help="region name (A-Z a-z 0-9 _ -, up to 64)")
    init.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"broker port (default {DEFAULT_PORT})")
    init.add_argument("--host", default=None,
                      help="the name or address devices use to reach the broker; it goes into the "
                           "server certificate beside 127.0.0.1, ::1 and localhost (default 127.0.0.1, "
                           "with a warning: only this machine reaches it)")
    init.add_argument("--bind", default=None,
                      help="listener address of the managed broker (default: --host if it is an "
                           "address, else 0.0.0.0)")
    init.add_argument("--database", default="", metavar="URL",
                      help="keep the hub's state in PostgreSQL (postgresql://USER@HOST:PORT/DB) instead of hub.db, "
                           "for hub replicas on other machines (docs/scaling.md)")
    init.add_argument("--force", action="store_true",
                      help="replace an existing hub; its files are moved to DIR/replaced-<time>/ and "
                           "every certificate it issued stops working")

    prov = sub.add_parser(
        "provision", help="write device bundles and register the devices",
        description="Write OUT/<device>/ with agent.toml, ca.crt, device.crt and device.key (0600) for "
                    "each device, and register it. Re-running is idempotent: a valid bundle keeps its "
                    "certificate. Device ids: 1 to 64 of A-Z a-z 0-9 _ -.")
    _dir_arg(prov)
    prov.add_argument("--out", type=Path, required=True, help="folder that receives one bundle per device")
    prov.add_argument("--profile", default="generic-linux",
                      help="firmware profile for devices without one (default generic-linux)")
    prov.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                      help="tag for every device named here (repeatable)")
    prov.add_argument("--inventory", type=Path, metavar="CSV",
                      help="CSV with columns: device id, profile, tags as k=v;k=v (header row optional)")
    prov.add_argument("--csr", type=Path, metavar="FILE",
                      help="sign this certificate request (PEM or DER, CN = the device id) made on the "
                           "device, so its key never leaves it; exactly one DEVICE_ID")
    prov.add_argument("--reissue", action="store_true",
                      help="issue new certificates even where the bundle's are still good; re-admits "
                           "a revoked device")
    prov.add_argument("devices", nargs="*", metavar="DEVICE_ID")

    rev = sub.add_parser(
        "revoke", help="lock a device out now",
        description="Revoke every certificate of DEVICE_ID: the CRL is re-issued, the broker reloaded, "
                    "and the device's live session closed (within 5 s when the broker runs).")
    _dir_arg(rev)
    rev.add_argument("device", metavar="DEVICE_ID")

    run = sub.add_parser(
        "run", help="run the hub (and the managed Mosquitto) until SIGTERM/SIGINT",
        description="Start and supervise Mosquitto (restarted if it dies, stopped on exit) unless "
                    "hub.toml sets broker.mode = \"external\" or this is a --replica, and run the hub "
                    "service: presence, ingest and acknowledgments, coordination, policy rollouts, devices' "
                    "certificate renewals, and the upkeep of the CRL and of the broker's and the hub's own "
                    "certificates. Logs go to stderr.")
    _dir_arg(run)
    run.add_argument("--replica", metavar="NAME",
                     help="run as the named replica of this hub (listed in hub.toml [hub] replicas): it shares "
                          "the database and the broker, ingests a share of the devices' messages, and takes over "
                          "rollouts and coordination timers when the leading process stops (docs/scaling.md)")

    dev = sub.add_parser("devices", help="list the fleet",
                         description="One row per registered device: online, last seen, applied policy "
                                     "version, backlog, dropped readings, certificate expiry.")
    _dir_arg(dev)
    dev.add_argument("--json", action="store_true", help="one JSON object per line")

    tel = sub.add_parser("telemetry", help="list stored readings",
                         description="Readings the hub has committed, ordered by device and sequence number. "
                                     "With --json: one object per line with device, seq, ts (seconds since the "
                                     "epoch, UTC), metric, value.")
    _dir_arg(tel)
    tel.add_argument("--device", metavar="ID", help="only this device")
    tel.add_argument("--since", metavar="T", type=moment, help=f"only readings taken at or after T: {MOMENT_HELP}")
    tel.add_argument("--until", metavar="T", type=moment, help="only readings taken before T (same forms)")
    tel.add_argument("--metric", metavar="NAME", help="only this metric")
    tel.add_argument("--limit", type=int, metavar="N", help="at most N readings")
    tel.add_argument("--json", action="store_true", help="one JSON object per line")

    evt = sub.add_parser("events", help="list stored decisions and actions",
                         description="Events the hub has committed (rule_fired, action_*, escalation, "
                                     "outbox_corrupt, ...), ordered by device and sequence number. With "
                                     "--json: one object per line with device, seq, ts (seconds since the "
                                     "epoch, UTC), kind, policy_version, rule, and the rest of the event "
                                     "under body.")
    _dir_arg(evt)
    evt.add_argument("--device", metavar="ID", help="only this device")
    evt.add_argument("--kind", metavar="K", help="only this kind (rule_fired, action_failed, escalation, ...)")
    evt.add_argument("--since", metavar="T", type=moment, help=f"only events at or after T: {MOMENT_HELP}")
    evt.add_argument("--limit", type=int, metavar="N", help="at most N events")
    evt.add_argument("--json", action="store_true", help="one JSON object per line")

    units = sub.add_parser("units", help="print the systemd unit or the Mosquitto snippet, or install it",
                           description="Print a file shipped with this installation: edge-hub.service (the "
                                       "default), or mosquitto-edgefleet.conf for Debian's own broker "
                                       "(docs/operations.md); or write it into DIR with --install.")
    units.add_argument("name", nargs="?", default=HUB_UNITS[0], choices=HUB_UNITS)
    units.add_argument("--install", type=Path, metavar="DIR",
                       help="write it into DIR (/etc/systemd/system for the unit, /etc/mosquitto/conf.d for "
                            "the snippet) instead of printing it")

    policy_commands.add_parser(sub, _dir_arg)
    export_command.add_parser(sub, _dir_arg)
    coordination_commands.add_parsers(sub, _dir_arg)
    enroll_commands.add_parsers(sub, _dir_arg)

    from hub.cli.status import EXPIRY_WARNING_DAYS

    st = sub.add_parser("status", help="the region's figures and what needs a person, on one screen",
                        description="Figures: telemetry coverage, ingest rate, device backlogs, action "
                                    "success rate and decision latency, devices on their intended policy, "
                                    "lease waits (the metrics endpoint's figures). Then what needs a person: "
                                    "offline devices, the latest escalation per device and rule, rejected "
                                    "messages by reason, the CRL's next update, the broker's certificate, "
                                    "the latest policy rollout, pending approvals, devices off their intended "
                                    "policy (drifted), and certificates that expire within "
                                    f"{EXPIRY_WARNING_DAYS} days.")
    _dir_arg(st)
    st.add_argument("--json", action="store_true", help="the whole status as one JSON object")

    rep = sub.add_parser("replica", help="hub replicas on other machines",
                         description="Replicas on other machines share the hub's PostgreSQL database and broker "
                                     "(docs/scaling.md).")
    rep_sub = rep.add_subparsers(dest="replica_command", required=True, metavar="SUBCOMMAND")
    create = rep_sub.add_parser(
        "create", help="a self-contained folder to run a replica from on another machine",
        description="Write FOLDER with what replica NAME needs on another machine: its own certificate (CN "
                    "hub.REGION.NAME), the CA's certificate, the policy-signing key, the share group, and a "
                    "hub.toml with the database URL and the broker's address. The CA key stays here. Copy "
                    "FOLDER there and run `edge-hub run --dir FOLDER`. NAME must be in [hub] replicas.")
    _dir_arg(create)
    create.add_argument("--name", required=True, help="the replica's name, listed in hub.toml [hub] replicas")
    create.add_argument("--out", type=Path, required=True, help="the folder to make (new or empty)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[logfmt.handler(sys.stderr)])  # docs/cli.md "Logs"
    logging.getLogger("aiosqlite").setLevel(logging.INFO)  # one line per SQL call drowns the rest
    commands: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
        "init": _init, "provision": _provision, "revoke": _revoke, "devices": _devices,
        "telemetry": _telemetry, "events": _events, "status": _status, "policy": policy_commands.run,
        "leases": coordination_commands.run, "approvals": coordination_commands.run,
        "task": coordination_commands.run, "tasks": coordination_commands.run, "export": export_command.run,
        "enroll": enroll_commands.run, "replica": _replica,
    }
    if args.command == "units":
        return units_command("edge-hub", args.name, args.install)
    try:
        if args.command == "run":
            return _run(args)
        return asyncio.run(commands[args.command](args))
    except UsageError as exc:
        print(f"edge-hub: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HubError as exc:
        print(f"edge-hub: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except PermissionError as exc:  # run as another account than the hub directory's (docs/operations.md)
        print(f"edge-hub: {permission_advice(exc.filename)}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.OperationalError as exc:
        if not database_access_denied(exc):
            raise
        hub_dir = getattr(args, "dir", None)
        advice = database_advice(HubPaths(hub_dir).db) if isinstance(hub_dir, Path) else permission_advice(None)
        print(f"edge-hub: cannot use the hub database ({exc}): {advice}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE


async def _init(args: argparse.Namespace) -> int:
    import ipaddress

    from hub.pki.init import init_hub

    if args.host is None:
        args.host = LOOPBACK_HOST
        print(f"edge-hub: warning: no --host given, so device bundles will tell devices to dial {LOOPBACK_HOST}, "
              "which only this machine reaches; for devices elsewhere, run this again with --force --host NAME "
              "(the name or address they dial) before provisioning any", file=sys.stderr)
    bind = args.bind
    if bind is None:
        try:
            ipaddress.ip_address(args.host)
            bind = args.host
        except ValueError:
            bind = "0.0.0.0"  # noqa: S104  # a named host: devices reach it from the network
    paths = await init_hub(args.dir, args.region, port=args.port, host=args.host, bind=bind, force=args.force,
                           database=args.database)
    print(f"hub for region {args.region} created in {paths.root}")
    print(f"  fleet CA        {paths.ca_cert}")
    print(f"  hub identity    {paths.hub_cert}")
    print(f"  broker          {args.host}:{args.port} (listening on {bind})")
    print(f"next: edge-hub provision --dir {args.dir} --out BUNDLES DEVICE_ID...; edge-hub run --dir {args.dir}")
    return EXIT_OK


async def _provision(args: argparse.Namespace) -> int:
    from hub.pki.provision import (
        DeviceSpec,
        Provisioner,
        load_csr,
        parse_tags,
        provision_all,
        read_inventory,
        validate_specs,
    )
    from hub.rollout import rollouts as rollout

    paths, config = load_hub(args.dir)
    tags = parse_tags(args.tag)
    specs = [DeviceSpec(d, args.profile, dict(tags)) for d in args.devices]
    if args.inventory:
        specs += [DeviceSpec(s.device, s.profile, {**tags, **s.tags})
                  for s in read_inventory(args.inventory, args.profile)]
    if not specs:
        raise UsageError("name at least one DEVICE_ID or give --inventory CSV")
    if args.csr and len(specs) != 1:
        raise UsageError("--csr signs one device's request: name exactly one DEVICE_ID")
    validate_specs(specs)
    csr = load_csr(args.csr) if args.csr else None
    store = await open_store(config.database.url, paths.db)
    try:
        provisioner = Provisioner(paths, config, store, args.out.resolve(), reissue=args.reissue)
        with _interruptible() as received:
            if csr is not None:
                results = {specs[0].device: await provisioner.provision(specs[0], csr)}
            else:
                results = await _with_progress(len(specs), lambda advance: provision_all(
                    provisioner, specs, advance, lambda: bool(received)))
        admitted = await rollout.admit(store, config.region, list(results), time.time())
    finally:
        await store.close()
    counts: dict[str, int] = {}
    for action in results.values():
        counts[action] = counts.get(action, 0) + 1
    summary = ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
    print(f"{len(results)} device bundle(s) in {args.out}: {summary}")
    _print_admissions(admitted)
    if received:
        left = [s.device for s in specs if s.device not in results]
        named = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        print(f"edge-hub: interrupted by {received[0].name}: {len(results)} of {len(specs)} device(s) finished, "
              f"{len(left)} not begun ({named or 'none'}); run the same command again to finish them",
              file=sys.stderr)
        return 128 + received[0].value
    return EXIT_OK


@contextlib.contextmanager
def _interruptible() -> Iterator[list[signal.Signals]]:
    """SIGINT/SIGTERM are noted (in the list yielded) instead of stopping the work at once, so a
    command can finish the step in hand and say what it did not do; the handlers go at the end."""
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, received.append, sig)
    try:
        yield received
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _print_admissions(admitted: list[Admission]) -> None:
    """What the new devices run once they connect: the policy their peers were given."""
    given: dict[int, int] = {}
    waiting: dict[int, int] = {}
    for a in admitted:
        if a.version is not None:
            given[a.version] = given.get(a.version, 0) + 1
        if a.waiting and a.rollout is not None:
            waiting[a.rollout] = waiting.get(a.rollout, 0) + 1
        if a.refused:
            print(f"edge-hub: {a.device}: {a.refused}; it keeps its local policy until a push that fits it",
                  file=sys.stderr)
    for version, n in sorted(given.items()):
        print(f"{n} new device(s) get policy version {version}, as their peers did, when they connect")
    for rollout_id, n in sorted(waiting.items()):
        print(f"{n} new device(s) joined rollout {rollout_id} in progress; a later wave reaches them")


async def _with_progress(total: int, work: Callable[[Callable[[str], None]], Awaitable[Any]]) -> Any:
    if not sys.stderr.isatty() or total < 2:
        return await work(lambda _: None)
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("provisioning", total=total)
        return await work(lambda device: progress.update(task, advance=1, description=device))


async def _revoke(args: argparse.Namespace) -> int:
    from hub.pki.revocation import revoke

    paths, config = load_hub(args.dir)
    store = await open_store(config.database.url, paths.db)
    try:
        report = await revoke(paths, config, store, args.device)
    finally:
        await store.close()
    print(f"revoked {report.device}: {report.certificates} certificate(s) in the CRL")
    if report.session_closed:
        print(f"the broker refuses it now and its live session was closed ({report.elapsed:.1f} s)")
        return EXIT_OK
    if not report.broker_reloaded:
        print("the broker is external and no broker.reload_command is set: reload it yourself so it "
              "re-reads the CRL, then run this command again to close a live session")
    else:
        print("the broker is not running or did not confirm: the CRL applies when it (re)starts")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from hub.service import run_hub

    paths, config = load_hub(args.dir)
    try:
        asyncio.run(run_hub(paths, config, args.replica))
    except HubAlreadyRunning as exc:  # a second copy started by mistake: it must not touch the first's broker
        print(f"edge-hub: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


async def _devices(args: argparse.Namespace) -> int:

    paths, config = load_hub(args.dir)
    store = await open_store(config.database.url, paths.db)
    try:
        rows = await store.devices(drift_grace_s=config.rollout.drift_grace_s)
    finally:
        await store.close()
    if args.json:
        for row in rows:
            sys.stdout.write(msgspec.json.encode(row).decode() + "\n")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table("device", "profile", "tags", "online", "last seen", "policy", "backlog", "dropped", "cert expires")
    for r in rows:
        state = "revoked" if r.revoked else ("yes" if r.online else "no")
        table.add_row(r.device, r.profile, ",".join(f"{k}={v}" for k, v in r.tags.items()), state,
                      r.last_seen or "never", _policy_cell(r), _dash(r.backlog), _dash(r.dropped),
                      (r.cert_expires or "-")[:10])
    class PipedConsole(Console):
        def on_broken_pipe(self) -> None:  # rich would exit 1 itself; edgefleet.runtime.pipes gives 141
            raise BrokenPipeError

    # Piped output (logs, CI) gets a fixed width instead of rich's 80-column fallback.
    PipedConsole(width=None if sys.stdout.isatty() else 140).print(table)
    online = sum(r.online for r in rows)
    print(f"{len(rows)} device(s), {online} online")
    return EXIT_OK


async def _telemetry(args: argparse.Namespace) -> int:
    def text(row: TelemetryRow) -> str:
        flag = "\t(clock unknown)" if row.clock_unknown else ""
        return f"{row.device}\t{row.seq}\t{when(row.ts)}\t{row.metric}\t{row.value:g}{flag}"

    return await _stream(args, "reading(s)", text, lambda store: store.telemetry(
        device=args.device, since=args.since, until=args.until, metric=args.metric, limit=args.limit))


async def _events(args: argparse.Namespace) -> int:
    def text(row: EventRow) -> str:
        return (f"{when(row.ts)}\t{row.device}\t{row.seq}\t{row.kind}\t{row.rule or '-'}\t"
                f"{event_detail(row.kind, row.body)}")

    return await _stream(args, "event(s)", text, lambda store: store.events(
        device=args.device, since=args.since, kind=args.kind, limit=args.limit))


async def _stream(args: argparse.Namespace, noun: str, text: Callable[[Any], str],
                  rows: Callable[[HubState], AsyncGenerator[Any, None]]) -> int:
    """Print a listing as it is read: JSON lines, or tab-separated text with a count on stderr."""

    paths, config = load_hub(args.dir)
    store = await open_store(config.database.url, paths.db)
    out = sys.stdout
    count = 0
    try:
        if args.device is not None and args.device != config.identity and not await store.known_device(args.device):
            raise UsageError(f"no device {args.device!r} is registered with this hub or has stored records: "
                             f"check the id with edge-hub devices --dir {args.dir}")
        # Closed before the store, also when a write fails (`| head` left): a listing left open
        # would be finalized later, on a closed database.
        async with contextlib.aclosing(rows(store)) as listing:
            async for row in listing:
                count += 1
                out.write((msgspec.json.encode(row).decode() if args.json else text(row)) + "\n")
    finally:
        await store.close()
    if not args.json:
        print(f"{count} {noun}", file=sys.stderr)
    return EXIT_OK


async def _status(args: argparse.Namespace) -> int:
    from hub.cli import status

    paths, config = load_hub(args.dir)
    try:
        current = await status.build(paths, config)
    except StoreUnavailable as exc:
        raise HubError(f"{exc}: a running hub acknowledges nothing until it answers again (the devices keep "
                       "their readings) and resumes by itself; see docs/operations.md") from None
    if args.json:
        sys.stdout.write(msgspec.json.encode(current.report).decode() + "\n")
    else:
        print(status.render(current))
    return EXIT_OK


async def _replica(args: argparse.Namespace) -> int:
    from hub.region.replicas import create_replica_folder

    paths, config = load_hub(args.dir)
    folder = await create_replica_folder(paths, config, args.name, args.out)
    print(f"{folder}: copy it to the replica's machine and run edge-hub run --dir {folder.name} there "
          "(it holds a private key: copy it as you would the hub directory)")
    return EXIT_OK


def _policy_cell(row: DeviceRow) -> str:
    """Applied version, and the intended one when they differ ("3→5", "3→5 drifted")."""
    text = _dash(row.policy_version)
    if row.policy_intended is not None and row.policy_intended != row.policy_version:
        text += f"→{row.policy_intended}" + (" drifted" if row.policy_drifted else "")
    return text


def _dash(value: object) -> str:
    return "-" if value is None else str(value)
