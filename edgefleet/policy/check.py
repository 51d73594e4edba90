"""The policy-against-profile check: every check an agent applies to a policy before it runs it,
which the hub runs too before it signs one."""

from __future__ import annotations

from edgefleet.policy.allowlist import actuator_call, allowlist_refusal
from edgefleet.policy.document import Policy, PolicyError, Problem, validate_policy
from edgefleet.policy.profiles import SYSTEM_METRICS, Profile, produced_metric


def check_policy(text: str, profile: Profile) -> Policy:
    """Every check an agent of `profile` applies to a policy before it runs it (the hub runs
    the same ones before it signs); raises PolicyError with lines and columns."""
    try:
        policy = validate_policy(text, metrics=known_metrics(profile), actuators_allowed=profile.actuators.allowed)
    except PolicyError as exc:
        at = [i for i, p in enumerate(exc.problems) if "unknown metric" in p.message]
        if at:  # the hint goes under the last unknown-metric problem, not whatever came last
            produced = ", ".join(sorted(known_metrics(profile) or ()))
            p = exc.problems[at[-1]]
            exc.problems[at[-1]] = Problem(p.line, p.col, f"{p.message}\n  (profile {profile.name!r} produces: "
                                                               f"{produced})")
            raise PolicyError(exc.problems) from None
        raise
    problems = []
    for rule in policy.rules:
        unknown = sorted(m for m in rule.when.metrics | rule.clear.metrics if not produced_metric(profile, m))
        if unknown:
            problems.append(Problem(rule.line, 1, f"rule {rule.name!r} reads {', '.join(unknown)}, which profile "
                                                  f"{profile.name!r} does not produce"))
        kind, args, _ = actuator_call(rule)
        refused = allowlist_refusal(profile.actuators, kind, args)
        if refused:  # the refusal the rule would meet each time it fires, caught before the policy runs
            problems.append(Problem(rule.line, 1, f"rule {rule.name!r}: its {kind} action would be refused on "
                                                  f"profile {profile.name!r}: {refused.rstrip('.')}"))
    if problems:
        raise PolicyError(problems)
    return policy


def known_metrics(profile: Profile) -> set[str] | None:
    """Every metric the profile can produce, or None when some are only known at run time
    (thermal zones); then rules are checked with `produced_metric` instead, without a column."""
    names: set[str] = set()
    for sensor in profile.sensors:
        if sensor.kind == "thermal":
            return None
        if sensor.kind == "sim":
            names |= {f"sig{i}" for i in range(profile.sim.signals)}
        elif sensor.kind == "system":
            names |= set(sensor.metrics) or set(SYSTEM_METRICS)
    for spec in profile.field_sensors:
        points = spec.points()
        if points is None:
            return None
        names |= points
    return names
