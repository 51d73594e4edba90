"""A policy whose action the profile's allowlists would refuse is refused before it runs, with the
very sentence the actuator gives when the rule fires (one check for both)."""

from __future__ import annotations

import pytest

from edge_agent.decide.actuators import Actuators
from edgefleet.policy.check import check_policy
from edgefleet.policy.document import PolicyError
from edgefleet.policy.profiles import load_profile

RESTART_COLLECTOR = '''\
[[rules]]
name = "restart-collector"
when = "load1 > 4"
clear = "load1 < 2"
action = "systemd_restart"
args = { unit = "edge-collector.service" }
offline = "act"
'''
RULES = RESTART_COLLECTOR + '''
[[rules]]
name = "wipe"
when = "cpu_temp > 90"
clear = "cpu_temp < 80"
action = "command"
args = { argv = ["/bin/rm", "-rf", "/var/lib/edge-app"] }
offline = "act"

[[rules]]
name = "measure"
when = "cpu_temp > 70"
clear = "cpu_temp < 60"
action = "command"
args = { argv = ["/usr/bin/vcgencmd", "measure_temp", "--verbose"] }
offline = "act"
'''


async def fired(kind: str, args: dict[str, object]) -> str:
    """What an rpi-4 agent's actuators say when a rule with this action fires."""

    async def alert(message: str, severity: str) -> None:
        raise AssertionError("not reached")

    actuators = Actuators(load_profile("rpi-4").actuators, set_rate=lambda sensor, interval: None, alert=alert)
    result = await actuators.run(kind, args, timeout=5.0)
    assert result.refused
    return result.detail


async def test_units_and_argv_outside_the_allowlists_are_refused_as_the_actuator_would() -> None:
    with pytest.raises(PolicyError) as refused:
        check_policy(RULES, load_profile("rpi-4"))
    problems = {p.line: p.message for p in refused.value.problems}
    assert sorted(problems) == [1, 9]  # the third rule's argv starts with the allowed prefix
    unit = await fired("systemd_restart", {"unit": "edge-collector.service"})
    argv = await fired("command", {"argv": ["/bin/rm", "-rf", "/var/lib/edge-app"]})
    assert problems[1] == ("rule 'restart-collector': its systemd_restart action would be refused on profile "
                           f"'rpi-4': {unit.rstrip('.')}")
    assert "allowed units: edge-app.service" in unit
    assert problems[9] == f"rule 'wipe': its command action would be refused on profile 'rpi-4': {argv.rstrip('.')}"
    assert "allowed prefix: /usr/bin/vcgencmd measure_temp" in argv


def test_an_allowlisted_unit_and_command_prefix_pass() -> None:
    text = RULES.replace("edge-collector.service", "edge-app.service").replace(
        '["/bin/rm", "-rf", "/var/lib/edge-app"]', '["/usr/bin/vcgencmd", "measure_temp"]')
    assert [r.name for r in check_policy(text, load_profile("rpi-4")).rules] == [
        "restart-collector", "wipe", "measure"]
