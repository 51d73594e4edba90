"""The fixtures every layer may use; they live in tests/support/harness.py with the process harness."""

from tests.support.harness import bundles, hub, hub_dir, work_root, workdir

__all__ = ["bundles", "hub", "hub_dir", "work_root", "workdir"]
