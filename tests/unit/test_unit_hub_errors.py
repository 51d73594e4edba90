"""One hub error root: where the hub calls shared code, a shared error becomes the hub's own,
with the same message, so the CLI's exit codes and sentences stay what they were."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edgefleet import errors as shared
from edgefleet.runtime.exposition import MetricsUnavailable
from hub.cli.main import main
from hub.config import HubPaths
from hub.errors import HubAlreadyRunning, HubError, UsageError
from hub.metrics import FiguresUnavailable, HubCollector
from hub.pki.init import init_hub
from hub.service import hold_run_lock

ROOT = Path(__file__).resolve().parents[2]
POLICY = ('version = 1\n[[rules]]\nname = "r"\nwhen = "sig0 > 1"\nclear = "sig0 < 1"\naction = "record"\n'
          'offline = "skip"\n')


def test_an_unknown_profile_is_a_usage_error_in_one_sentence(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.toml"
    path.write_text(POLICY, encoding="utf-8")
    assert main(["policy", "validate", str(path), "--profile", "no-such"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-hub: no firmware profile 'no-such'; available: ")
    assert err.count("\n") == 1


def test_a_second_hub_on_one_directory_is_the_hubs_error_with_the_shared_message(tmp_path: Path) -> None:
    paths = HubPaths(tmp_path)
    held = hold_run_lock(paths, None)
    try:
        with pytest.raises(HubAlreadyRunning) as refused:
            hold_run_lock(paths, None)
    finally:
        held.release()
    assert isinstance(refused.value, UsageError)  # exit 2, as before
    assert isinstance(refused.value.__cause__, shared.AlreadyRunning)
    assert str(refused.value) == str(refused.value.__cause__)
    assert str(refused.value).startswith("another edge-hub run (pid ")


async def test_a_bad_init_setting_is_a_usage_error_with_the_shared_message(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as refused:
        await init_hub(tmp_path / "hub", "eu-1", port=70000, host="127.0.0.1", bind="127.0.0.1", force=False)
    assert isinstance(refused.value.__cause__, shared.ConfigError)
    assert str(refused.value) == str(refused.value.__cause__)
    assert not (tmp_path / "hub").exists()  # refused before anything was written


def test_an_unreadable_database_is_the_hubs_error_and_the_endpoints_503(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(FiguresUnavailable, match="cannot read the hub database") as refused:
        HubCollector(db, "eu-1").collect()
    assert isinstance(refused.value, HubError)
    assert isinstance(refused.value, MetricsUnavailable)  # what the shared endpoint answers 503 for


def test_the_hub_raises_no_shared_error_itself() -> None:
    """`raise X(...)` in hub/ never names a shared error class (catching and re-raising as the hub's is the rule)."""
    shared_names = {name for name, value in vars(shared).items()
                    if isinstance(value, type) and issubclass(value, BaseException)} | {"MetricsUnavailable"}
    raised = []
    for path in sorted((ROOT / "hub").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = call.attr if isinstance(call, ast.Attribute) else getattr(call, "id", "")
                if name in shared_names:
                    raised.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert raised == []
