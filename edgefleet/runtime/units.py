"""The systemd units and the Mosquitto snippet that ship inside the package: `edge-agent units`
and `edge-hub units` print one, or install it into a folder (docs/operations.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final, TextIO

from edgefleet.errors import ConfigError
from edgefleet.runtime.files import permission_advice, write_atomic

# An installed wheel carries them inside the edge_agent package (a folder beside this one, never
# imported from here); a source checkout has them at the top level.
_SITE_DIR: Final = Path(__file__).resolve().parents[2]
UNIT_DIRS: Final = (_SITE_DIR / "edge_agent" / "systemd", _SITE_DIR / "systemd")
AGENT_UNITS: Final = ("edge-agent.service",)
HUB_UNITS: Final = ("edge-hub.service", "mosquitto-edgefleet.conf")
_NEXT: Final = {
    "edge-agent.service": "systemctl daemon-reload && systemctl enable --now edge-agent",
    "edge-hub.service": "systemctl daemon-reload && systemctl enable --now edge-hub",
    "mosquitto-edgefleet.conf": "follow the steps in its header, then systemctl restart mosquitto",
}


def unit_file(name: str) -> Path:
    for directory in UNIT_DIRS:
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(f"{name} is not in this installation ({', '.join(map(str, UNIT_DIRS))}): reinstall edgefleet")


def print_unit(name: str, out: TextIO) -> None:
    out.write(unit_file(name).read_text(encoding="utf-8"))


def install_unit(name: str, folder: Path) -> str:
    """Write `name` into `folder` (atomically, mode 0644); return what to run next."""
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: give an existing one, such as /etc/systemd/system")
    write_atomic(folder / name, unit_file(name).read_bytes(), 0o644)
    return f"installed {folder / name}; next: {_NEXT[name]}"


def units_command(program: str, name: str, folder: Path | None) -> int:
    """`edge-agent units` and `edge-hub units`: print a shipped file, or install it into `folder`; the exit code."""
    try:
        if folder is None:
            print_unit(name, sys.stdout)
        else:
            print(install_unit(name, folder))
    except ConfigError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"{program}: {permission_advice(exc.filename)}", file=sys.stderr)
        return 2
    return 0
