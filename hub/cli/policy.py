"""`edge-hub policy ...`: validate, push, status, promote, abort, rollback."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from edgefleet.errors import ConfigError
from edgefleet.policy.check import check_policy
from edgefleet.policy.document import Policy, PolicyError, validate_policy
from edgefleet.policy.profiles import load_profile
from edgefleet.runtime.settings import duration_arg
from hub.config import load_hub
from hub.db.engines import open_store
from hub.errors import UsageError

if TYPE_CHECKING:
    from hub.db.rows import DeviceRow

EXIT_OK, EXIT_INVALID = 0, 2


def add_parser(sub: Any, dir_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    pol = sub.add_parser(
        "policy", help="check, push and roll out signed policies",
        description="Policies carry the devices' rules (docs/policies.md). The hub numbers every push with a "
                    "version that only grows, signs it per device with its Ed25519 policy key, and rolls it "
                    "out: a canary cohort first, then growing waves, rolling back by itself when a health "
                    "gate in hub.toml [rollout] breaches. The running hub (edge-hub run) does the sending.")
    cmds = pol.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")

    val = cmds.add_parser(
        "validate", help="check a policy file the way the agents will",
        description="Run exactly the checks an agent applies before it runs a policy: TOML, rule syntax, "
                    "metrics the profile produces, actions the profile allows. Errors give line and column. "
                    "Profiles come from --profile, else the policy's [target] profile, else (with --dir) "
                    "the profiles of the registered devices it targets.")
    val.add_argument("file", type=Path, metavar="FILE")
    val.add_argument("--profile", action="append", default=[], metavar="NAME",
                     help="check against this firmware profile (repeatable)")
    val.add_argument("--dir", type=Path, metavar="DIR", help="a hub directory: check against its devices' profiles")

    push = cmds.add_parser(
        "push", help="sign and roll out a policy",
        description="Validate FILE against the profile of every targeted device (nothing is recorded if one "
                    "would refuse it), give it the next version, and start a rollout: with --canary, that "
                    "share of the targeted devices first (the same devices each time: a hash of the id), "
                    "then the waves of hub.toml, each baking for --bake while the health gates are watched. "
                    "Without --canary every targeted device gets it at once (still watched for --bake).")
    dir_arg(push)
    push.add_argument("file", type=Path, metavar="FILE")
    push.add_argument("--target", action="append", default=[], metavar="KEY=VALUE",
                      help="only devices with this tag, or profile=NAME (repeatable: different keys must all "
                           "hold, the same key again means any of its values); default every device")
    push.add_argument("--canary", type=_percent, metavar="PCT", help="percent of the targeted devices to go first")
    push.add_argument("--bake", type=duration_arg, metavar="DURATION",
                      help="how long each wave is watched before the next, e.g. 90s, 10m "
                           "(default: hub.toml rollout.bake_s with --canary, 0 without)")

    st = cmds.add_parser("status", help="rollouts, versions in force, drift and refusals",
                         description="The rollout in progress with its health-gate figures, the latest "
                                     "rollouts and why any was rolled back, how many devices run which "
                                     "version, and devices that drifted or refused a policy.")
    dir_arg(st)
    st.add_argument("--json", action="store_true", help="the whole status as one JSON object")

    for name, text in (("promote", "skip the remaining bake: every targeted device gets the version now"),
                       ("abort", "stop the rollout in progress; devices it reached go back to their previous "
                                 "policy (as a new version)"),
                       ("rollback", "undo the latest rollout, in progress or complete: devices it reached go "
                                    "back to their previous policy (as a new version)")):
        decision = cmds.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        dir_arg(decision)
        decision.add_argument("--rollout", type=int, metavar="ID",
                              help="the rollout to act on, when several run side by side (edge-hub policy status)")


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text}: use more than 0 and at most 100")
    return value


async def run(args: argparse.Namespace) -> int:
    command: dict[str, Callable[[argparse.Namespace], Any]] = {
        "validate": _validate, "push": _push, "status": _status,
        "promote": _decide, "abort": _decide, "rollback": _decide,
    }
    result: int = await command[args.policy_command](args)
    return result


# --- validate and push ---------------------------------------------------------------------


def _read(path: Path) -> tuple[str, Policy]:
    """The file's text and its profile-independent validation; PolicyInvalid on problems."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    try:
        return text, validate_policy(text, metrics=None, actuators_allowed=None)
    except PolicyError as exc:
        raise PolicyInvalid(path, {"": exc}) from None


class PolicyInvalid(UsageError):
    """Problems per profile ('' = in any profile), printed as FILE:LINE:COL: message."""

    def __init__(self, path: Path, errors: dict[str, PolicyError]) -> None:
        lines = []
        for profile, error in errors.items():
            suffix = f" [profile {profile}]" if profile else ""
            lines += [f"{path}:{p.line}:{p.col}: {p.message}{suffix}" for p in error.problems]
        super().__init__("\n".join(lines) + f"\n{path}: not valid; nothing was changed")


def _check_profiles(path: Path, text: str, profiles: set[str]) -> None:
    errors: dict[str, PolicyError] = {}
    for name in sorted(profiles):
        try:
            profile = load_profile(name)
        except ConfigError as exc:  # the shared error, as the hub's: same message, exit 2
            raise UsageError(str(exc)) from exc
        try:
            check_policy(text, profile)
        except PolicyError as exc:
            errors[name] = exc
    if errors:
        raise PolicyInvalid(path, errors)


async def _validate(args: argparse.Namespace) -> int:
    text, policy = _read(args.file)
    profiles = set(args.profile)
    if not profiles and policy.target and policy.target.profile:
        profiles = {policy.target.profile}
    if not profiles and args.dir:
        from hub.rollout import rollouts as rollout

        paths, config = load_hub(args.dir)
        store = await open_store(config.database.url, paths.db)
        try:
            candidates = await store.query(rollout.CANDIDATES)
        finally:
            await store.close()
        profiles = set(rollout.targets(candidates, rollout.Selector(), policy, config.region).values())
    _check_profiles(args.file, text, profiles)
    where = f"profile(s) {', '.join(sorted(profiles))}" if profiles else \
        "any profile (metrics and actions not checked: give --profile or --dir)"
    print(f"{args.file}: valid for {where}; {len(policy.rules)} rule(s)")
    return EXIT_OK


async def _push(args: argparse.Namespace) -> int:
    from hub.rollout import rollouts as rollout

    paths, config = load_hub(args.dir)
    text, policy = _read(args.file)
    selector = rollout.Selector.parse(args.target)
    bake = args.bake if args.bake is not None else (config.rollout.bake_s if args.canary else 0.0)
    store = await open_store(config.database.url, paths.db)
    try:
        targeted = rollout.targets(await store.query(rollout.CANDIDATES), selector, policy, config.region)
        profiles = set(targeted.values())
        _check_profiles(args.file, text, profiles)
        pushed = await rollout.push(
            store, config.identity, config.region, text, policy, selector=selector, canary_pct=args.canary,
            bake_s=bake, conf=config.rollout, origin=str(args.file.resolve()), now=time.time(),
            checked_profiles=profiles)
    finally:
        await store.close()
    waves = " → ".join(f"{w:g}%" for w in pushed.waves)
    print(f"version {pushed.version} (rollout {pushed.rollout}): {pushed.reached} of {pushed.targeted} targeted "
          f"device(s) in the first wave; waves {waves}, each watched for {bake:g} s")
    print(f"the running hub sends it within a second; follow it with: edge-hub policy status --dir {args.dir}")
    return EXIT_OK


# --- status and decisions ------------------------------------------------------------------


async def _status(args: argparse.Namespace) -> int:
    from hub.rollout import rollouts as rollout

    paths, config = load_hub(args.dir)
    store = await open_store(config.database.url, paths.db)
    try:
        recent = await rollout.recent(store)
        in_progress = await rollout.in_progress(store)
        for active in in_progress:
            h = await rollout.health(store, active["rollout"], active["version"], config.rollout)
            active["health"] = {k: v for k, v in vars(h).items() if k != "refusal_example"}
        devices = await store.devices(drift_grace_s=config.rollout.drift_grace_s)
    finally:
        await store.close()
    live = [d for d in devices if not d.revoked]
    versions: dict[str, dict[str, int]] = {}
    for d in live:
        key = str(d.policy_intended) if d.policy_intended is not None else "none"
        entry = versions.setdefault(key, {"intended": 0, "applied": 0})
        entry["intended"] += 1
        entry["applied"] += d.policy_intended is not None and d.policy_version == d.policy_intended
    report = {
        # "active": the newest in progress, as before rollouts could run side by side; "in_progress": all of them.
        "active": in_progress[-1] if in_progress else None, "in_progress": in_progress,
        "rollouts": recent, "versions": versions,
        "drifted": [{"device": d.device, "applied": d.policy_version, "intended": d.policy_intended}
                    for d in live if d.policy_drifted],
        # Refusals not superseded: of a newer version, or of one it could not even read (version 0).
        "refused": [{"device": d.device, **(d.policy_refused or {})} for d in live if _unresolved(d)],
    }
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
        return EXIT_OK
    print("\n".join(_status_lines(report)))
    return EXIT_OK


def _unresolved(device: DeviceRow) -> bool:
    """A refusal not superseded: of a version newer than the one applied, or of one it could not
    even read (version 0: its policy key is missing, or the signature did not check)."""
    if device.policy_refused is None:
        return False
    refused = device.policy_refused.get("version") or 0
    return refused == 0 or refused > (device.policy_version or 0)


def _status_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for active in report["in_progress"]:
        h = active["health"]
        waves = active["waves"]
        lines += [f"rollout {active['rollout']} in progress: version {active['version']} to {active['target']} "
                  f"({active['targeted']} devices), wave {active['wave']} of {len(waves)} "
                  f"({waves[active['wave'] - 1]:g}%), baking {active['bake_s']:g} s per wave",
                  f"  reached {h['reached']}: applied {h['applied']}, refused {h['refused']}, waiting "
                  f"{h['waiting']}, offline {h['offline']} (went offline {h['went_offline']}); actions "
                  f"{h['actions']} (failed {h['action_failures']}); escalations {h['escalations']}"]
    if not report["in_progress"]:
        lines.append("no rollout in progress")
    lines.append("latest rollouts:" if report["rollouts"] else "no policy has been pushed")
    for r in report["rollouts"]:
        reason = f" — {r['reason']}" if r["reason"] else ""
        lines.append(f"  {r['rollout']:>4}  version {r['version']:<5} {r['state']:<12} {r['target']}{reason}")
    lines.append("intended version: " + ", ".join(
        f"{v} on {n['intended']} (applied by {n['applied']})" for v, n in sorted(report["versions"].items())))
    lines.append(f"drifted: {len(report['drifted']) or 'none'}")
    lines += [f"  {d['device']}  applied {d['applied']}, intended {d['intended']}" for d in report["drifted"]]
    lines.append(f"refused: {len(report['refused']) or 'none'}")
    lines += [f"  {d['device']}  version {d.get('version')}: {d.get('reason')}: {d.get('detail')}"
              for d in report["refused"]]
    return lines


async def _decide(args: argparse.Namespace) -> int:
    from hub.rollout import rollouts as rollout

    paths, config = load_hub(args.dir)
    store = await open_store(config.database.url, paths.db)
    try:
        action = {"promote": rollout.promote, "abort": rollout.abort, "rollback": rollout.rollback}
        transition = await action[args.policy_command](store, config.identity, time.time(), args.rollout)
    finally:
        await store.close()
    print(transition.message)
    print("the running hub sends the change within a second")
    return EXIT_OK

