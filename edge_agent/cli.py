"""`edge-agent`: run the daemon, check a device's setup, or show its status."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
from pathlib import Path

from edge_agent import __version__
from edge_agent.config import DEFAULT_CONFIG, AgentSettings, load_settings
from edgefleet.errors import ConfigError
from edgefleet.policy.document import Policy
from edgefleet.runtime import logfmt
from edgefleet.runtime.files import database_access_denied, database_advice, permission_advice
from edgefleet.runtime.pipes import run_command
from edgefleet.runtime.settings import duration_arg
from edgefleet.runtime.units import AGENT_UNITS, units_command

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
SUMMARY_EVERY = 10.0  # seconds between `simulate` summary lines: a long run's log stays short


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="edgefleet device agent: samples sensors, decides locally, buffers every "
                    "reading in SQLite and syncs with the hub over mutual-TLS MQTT.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="PATH",
                       help=f"the device's agent.toml (default {DEFAULT_CONFIG}); paths inside it "
                            "are relative to its folder")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override a setting of agent.toml or of the firmware profile for this "
                            "run, with a dotted key: --set broker.port=8884 --set sim.rate_hz=10 "
                            "(values are TOML; repeatable)")

    run = sub.add_parser("run", help="run the agent daemon until SIGTERM/SIGINT",
                         description="Connect to the hub's broker with mutual TLS (MQTT v5), publish "
                                     "presence (retained, with a Last Will), and reconnect with capped, "
                                     "jittered backoff. Logs go to stderr.")
    with_config(run)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="overrides log_level in agent.toml")

    check = sub.add_parser("check", help="check config, files, permissions, clock and connectivity",
                           description="Validate the configuration, the certificate files and their "
                                       "permissions, the certificate's dates against the system clock, and "
                                       "that the broker accepts this device. Each problem is one sentence "
                                       "with its fix. Exit 0 when all is well, 1 when a check failed, 2 "
                                       "when the configuration itself is broken.")
    with_config(check)

    status = sub.add_parser("status", help="show the queue, acknowledgments, policy and recent errors",
                            description="Read-only, also while the agent runs: whether the agent runs, the "
                                        "outbox's queue and the hub's last acknowledgment, the policy in force, "
                                        "and error events the hub has not acknowledged yet. Exit 0 when the "
                                        "device looks healthy, 1 when something needs attention, 2 when the "
                                        "configuration is broken.")
    with_config(status)
    status.add_argument("--json", action="store_true", help="one JSON object (docs/cli.md)")

    units = sub.add_parser("units", help="print the systemd unit, or install it",
                           description="Print edge-agent.service, the systemd unit shipped with this installation "
                                       "(docs/operations.md), or write it into DIR with --install.")
    units.add_argument("--install", type=Path, metavar="DIR",
                       help="write the unit into DIR (for example /etc/systemd/system) instead of printing it")

    simulate = sub.add_parser(
        "simulate", help="run many complete agents in one process (load tests, benchmarks)",
        description="Run N complete agents in this process, on one event loop: each the real agent of "
                    "`edge-agent run` with the settings of its own bundle (DIR/<id>/agent.toml), its own outbox "
                    "(the bundle's state/), its own certificate and its own mutual-TLS connection. Runs until "
                    "SIGINT/SIGTERM or --duration, printing a one-line summary to stdout every --every seconds "
                    "and a last one at the end; logs go to stderr. Provision the devices first: edge-hub "
                    "provision --dir HUB --out DIR --profile sim d0001 d0002 ...",
        epilog="The sim profile samples 10 times a second; for thousands of agents on a small machine lighten "
               "each one: --set 'sensors=[{kind=\"sim\", interval_s=1.0}]' --set outbox.synchronous=normal. "
               "Watch the loop lag in the summary: past a few hundred ms this process cannot keep up. Exit 0 on "
               "a signal or at the end of --duration, 1 if an agent crashed, 2 for missing bundles, a broken "
               "agent.toml, an outbox another process has open, or too low a limit of open files.")
    simulate.add_argument("--bundles", type=Path, required=True, metavar="DIR",
                          help="folder of device bundles, one subfolder per device (edge-hub provision --out)")
    simulate.add_argument("--count", type=_positive, metavar="N",
                          help="run the first N bundles by name (default: all of them)")
    simulate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                          help="override a setting for every agent, as `edge-agent run --set` does (repeatable)")
    simulate.add_argument("--duration", type=duration_arg, metavar="DURATION",
                          help="stop after this long (seconds, or 30s, 5m, 1h); default: until SIGINT/SIGTERM")
    simulate.add_argument("--every", type=duration_arg, default=SUMMARY_EVERY, metavar="DURATION",
                          help=f"seconds between summary lines (default {SUMMARY_EVERY:g})")
    simulate.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning",
                          help="for every agent (default warning: info logs each connect of each agent)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), handlers=[logfmt.handler(sys.stderr)])  # docs/cli.md "Logs"


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "units":
        return units_command("edge-agent", AGENT_UNITS[0], args.install)
    try:
        settings = load_settings(args.config, args.overrides)
        policy = settings.load_policy()  # a broken policy is a configuration error too (exit 2)
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "check":
            return _check(settings)
        if args.command == "status":
            return _status(settings, policy, as_json=args.json)
        _logging(args.log_level or settings.config.log_level)
        return _run(settings, policy)
    except PermissionError as exc:  # run as another account than the files' (docs/operations.md)
        print(f"edge-agent: {permission_advice(exc.filename)}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.OperationalError as exc:
        if not database_access_denied(exc):
            raise
        from edge_agent.buffer.outbox import DB_NAME

        print(f"edge-agent: cannot use the outbox ({exc}): {database_advice(settings.state_dir / DB_NAME)}",
              file=sys.stderr)
        return EXIT_USAGE


def _check(settings: AgentSettings) -> int:
    from edge_agent.ops.checks import run_checks  # keeps `run` start-up lean

    findings = asyncio.run(run_checks(settings))
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'}  {f.name}: {f.message}")
    return EXIT_OK if all(f.ok for f in findings) else EXIT_FAILURE


def _status(settings: AgentSettings, policy: Policy | None, *, as_json: bool) -> int:
    import msgspec

    from edge_agent.ops.status import collect, render

    report = collect(settings, policy)
    print(msgspec.json.encode(report).decode() if as_json else render(report))
    return EXIT_OK if report.healthy else EXIT_FAILURE


def _run(settings: AgentSettings, policy: Policy | None) -> int:
    from edge_agent.agent import run_agent
    from edge_agent.identity.tls import IdentityFiles
    from edgefleet.errors import AlreadyRunning

    files = IdentityFiles(settings.tls, settings.state_dir)
    enrolling = settings.config.enroll is not None and files.current() is None and files.pending() is None
    refusals = [] if enrolling else files.refusals(settings.config.device_id)  # enrolling: it makes its own
    for sentence in refusals:  # each says what to do; nothing was started
        print(f"edge-agent: {sentence}", file=sys.stderr)
    if refusals:
        return EXIT_USAGE
    try:
        asyncio.run(run_agent(settings, policy))
    except KeyboardInterrupt:
        pass
    except AlreadyRunning as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if isinstance(exc, PermissionError) or (isinstance(exc, sqlite3.OperationalError)
                                                and database_access_denied(exc)):
            raise  # a setup problem, not a crash: main() says it in one sentence
        logging.getLogger("edge_agent").exception("the agent stopped on an unexpected error")
        return EXIT_FAILURE
    return EXIT_OK


def _simulate(args: argparse.Namespace) -> int:
    from edge_agent.ops import simulate

    _logging(args.log_level)
    try:
        return simulate.main(args.bundles, args.count, args.overrides, args.duration, args.every)
    except ConfigError as exc:
        print(f"edge-agent simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        logging.getLogger("edge_agent").exception("the simulation stopped on an unexpected error")
        return EXIT_FAILURE
