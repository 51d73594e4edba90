"""`edge-agent`: run the daemon, check a device's setup, or show its status."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from edge_agent import __version__, logfmt
from edge_agent.config import DEFAULT_CONFIG, AgentSettings, load_settings
from edge_agent.errors import ConfigError
from edge_agent.policy import Policy

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


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
    return parser


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), handlers=[logfmt.handler(sys.stderr)])  # docs/cli.md "Logs"
    # aiosqlite logs every statement with its arguments (whole batches of readings) at DEBUG.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLevelName(level.upper())))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, args.overrides)
        policy = settings.load_policy()  # a broken policy is a configuration error too (exit 2)
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check":
        return _check(settings)
    if args.command == "status":
        return _status(settings, policy, as_json=args.json)
    _logging(args.log_level or settings.config.log_level)
    return _run(settings, policy)


def _check(settings: AgentSettings) -> int:
    from edge_agent.checks import run_checks  # keeps `run` start-up lean

    findings = asyncio.run(run_checks(settings))
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'}  {f.name}: {f.message}")
    return EXIT_OK if all(f.ok for f in findings) else EXIT_FAILURE


def _status(settings: AgentSettings, policy: Policy | None, *, as_json: bool) -> int:
    import msgspec

    from edge_agent.status import collect, render

    report = collect(settings, policy)
    print(msgspec.json.encode(report).decode() if as_json else render(report))
    return EXIT_OK if report.healthy else EXIT_FAILURE


def _run(settings: AgentSettings, policy: Policy | None) -> int:
    from edge_agent.agent import run_agent
    from edge_agent.errors import IdentityError
    from edge_agent.identity import IdentityFiles

    files = IdentityFiles(settings.tls, settings.state_dir)
    if files.current() is None and files.pending() is None:
        try:
            files.load("bundle")
        except IdentityError as exc:
            print(f"edge-agent: cannot load the TLS identity ({exc}); run `edge-agent check --config "
                  f"{settings.path}` for details", file=sys.stderr)
            return EXIT_USAGE
    try:
        asyncio.run(run_agent(settings, policy))
    except KeyboardInterrupt:
        pass
    except Exception:
        logging.getLogger("edge_agent").exception("the agent stopped on an unexpected error")
        return EXIT_FAILURE
    return EXIT_OK
