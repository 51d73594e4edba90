"""Issue 15 items 16 and 20 (first two parts): an operator who runs a command as the wrong
account, or a key the hub cannot read, gets one sentence saying what to do and exit 2 — never
a traceback, never a hang, never a half-made bundle.

The commands run as root without the capabilities that let root read and write every file
(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so the kernel checks permissions exactly as it does
for `sudo -u edge-hub`; the hub's files are given to another account (`nobody`) the way
docs/operations.md gives them to `edge-hub`. (A real second account could not run this
checkout's interpreter, which lives under /root.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.support.harness import AGENT, HUB, HubDir

OTHER = "nobody"  # the account that owns the files in these tests
EXIT_USAGE = 2
RUN_TIMEOUT = 30.0  # `edge-hub run` must give up at once; this bounds "at once" on a loaded machine

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another account needs root")


def as_operator(*argv: str) -> list[str]:
    """argv run with ordinary file permissions (root without its DAC override), as `sudo -u` would."""
    if os.geteuid() != 0:
        return list(argv)
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *argv]


async def run_bounded(argv: list[str], timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:
    """Run argv; a process still running after `timeout` is killed and the test fails."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{' '.join(argv)} still ran after {timeout} s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_sentence(stderr: str) -> str:
    """What an operator sees must be one line, no traceback; the hub's own log lines aside."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("ts=")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def give_away(path: Path) -> None:
    for root, dirs, files in os.walk(path):
        for name in (root, *(os.path.join(root, n) for n in dirs + files)):
            shutil.chown(name, OTHER)


# --- 20: unreadable keys ------------------------------------------------------------------------


async def test_run_with_an_unreadable_policy_key_exits_at_once(hub_dir: HubDir) -> None:
    key = hub_dir.pki / "policy.key"
    key.chmod(0)
    code, _, err = await run_bounded(as_operator(HUB, "run", "--dir", str(hub_dir.dir)))
    assert code == EXIT_USAGE, err
    said = one_sentence(err)
    assert "policy-signing key" in said
    assert str(key) in said
    assert "chmod" in said


async def test_provision_with_an_unreadable_ca_key_leaves_no_bundle(hub_dir: HubDir, workdir: Path) -> None:
    key = hub_dir.pki / "ca.key"
    key.chmod(0)
    out = workdir / "bundles"
    code, _, err = await run_bounded(as_operator(HUB, "provision", "--dir", str(hub_dir.dir), "--out", str(out),
                                                 "--profile", "sim", "pi-001", "pi-002"))
    assert code == EXIT_USAGE, err
    said = one_sentence(err)
    assert "fleet CA key" in said
    assert str(key) in said
    assert not out.exists(), list(out.rglob("*"))
    key.chmod(0o600)  # once readable again, the same command works: nothing was left half done
    code, stdout, err = await run_bounded(as_operator(HUB, "provision", "--dir", str(hub_dir.dir), "--out", str(out),
                                                      "--profile", "sim", "pi-001", "pi-002"))
    assert code == 0, err
    assert "2 issued" in stdout


# --- 16: the wrong account ----------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("command", [
    pytest.param(["devices"], id="devices"),
    pytest.param(["status"], id="status"),
    pytest.param(["events"], id="events"),
    pytest.param(["revoke", "pi-001"], id="revoke"),
    pytest.param(["provision", "--profile", "sim", "pi-002"], id="provision"),
    pytest.param(["run"], id="run"),
])
async def test_hub_commands_as_another_account_say_whose_files_they_are(
    hub_dir: HubDir, workdir: Path, command: list[str]
) -> None:
    """The hub directory belongs to the service's account; the operator forgot `sudo -u`."""
    out = workdir / "bundles"
    await hub_dir.provision(out, "pi-001")
    give_away(hub_dir.dir)
    extra = ["--out", str(out)] if command[0] == "provision" else []
    code, _, err = await run_bounded(as_operator(HUB, command[0], "--dir", str(hub_dir.dir), *extra, *command[1:]))
    assert code == EXIT_USAGE, err
    said = one_sentence(err)
    # `run` first takes its lock in DIR/run (one hub per directory), the others first open hub.db.
    named = hub_dir.dir / ("run" if command[0] == "run" else "hub.db")
    assert str(named) in said or f"{hub_dir.dir} belongs to {OTHER}" in said, said
    assert f"sudo -u {OTHER}" in said


@needs_root
async def test_provision_into_a_folder_the_account_cannot_write(hub_dir: HubDir, workdir: Path) -> None:
    elsewhere = workdir / "theirs"
    elsewhere.mkdir(mode=0o755)
    shutil.chown(elsewhere, OTHER)
    code, _, err = await run_bounded(as_operator(HUB, "provision", "--dir", str(hub_dir.dir), "--out",
                                                 str(elsewhere / "bundles"), "--profile", "sim", "pi-001"))
    assert code == EXIT_USAGE, err
    said = one_sentence(err)
    assert str(elsewhere / "bundles") in said
    assert f"{elsewhere} belongs to {OTHER}" in said


@needs_root
async def test_agent_run_on_another_accounts_state_dir(hub_dir: HubDir, workdir: Path) -> None:
    """docs/operations.md: the state directory belongs to `edge-agent`; run by hand as someone else."""
    out = workdir / "bundles"
    await hub_dir.provision(out, "pi-001")
    state = out / "pi-001" / "state"
    state.mkdir(mode=0o700)
    shutil.chown(state, OTHER)
    code, _, err = await run_bounded(as_operator(AGENT, "run", "--config", str(out / "pi-001" / "agent.toml")))
    assert code == EXIT_USAGE, err
    said = one_sentence(err)
    assert str(state) in said
    assert f"sudo -u {OTHER}" in said


@needs_root
async def test_a_journal_left_by_another_account_is_named_and_not_called_corrupt(hub_dir: HubDir) -> None:
    """docs/operations.md's warning: a command run as another account leaves hub.db's WAL and
    shared-memory files owned by it. The next command must name them, never say "restore it
    from a backup" about a healthy database."""
    import sqlite3

    db = sqlite3.connect(hub_dir.dir / "hub.db")
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("SELECT COUNT(*) FROM devices").fetchall()  # the WAL and -shm files exist while this is open
        for suffix in ("-wal", "-shm"):
            shutil.chown(hub_dir.dir / f"hub.db{suffix}", OTHER)
        code, _, err = await run_bounded(as_operator(HUB, "devices", "--dir", str(hub_dir.dir)))
    finally:
        db.close()
    assert code == EXIT_USAGE, err
    said = one_sentence(err)
    assert str(hub_dir.dir / "hub.db-wal") in said
    assert f"sudo -u {OTHER}" in said
    assert "backup" not in said
