"""The benchmarks that reach into the outbox's internals (to count and time its commits) still
run: a tiny run of each, to its final JSON line. The figures are not checked here (bench/ is
where speed is measured); a bench broken by a refactor is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize(("script", "args"), [
    ("p1_outbox.py", ("--readings", "20000", "--reps", "1")),
    ("p4_decision.py", ("--seconds", "1", "--floor-commits", "20")),
], ids=["p1", "p4"])
def test_a_tiny_run_reaches_its_json_line(script: str, args: tuple[str, ...], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == script.removesuffix(".py")
