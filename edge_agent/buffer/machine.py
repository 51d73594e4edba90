"""Which machine this is: what tells an outbox copied onto another board (a cloned SD card)
from the original.

The sources, most trusted first (docs/store-and-forward.md, "Cloned devices"):
- the board's serial number (/proc/device-tree/serial-number, or "Serial" in /proc/cpuinfo on
  a Raspberry Pi): burnt into the SoC, never on the SD card;
- the MAC addresses of the physical network interfaces (/sys/class/net/*/device exists): on the
  hardware too; virtual interfaces (docker0, veth*, bridges) come and go and are left out;
- /etc/machine-id, last: a cloned image carries it along unless first boot regenerates it.
`state.machine` in agent.toml overrides them all (tests, or boards whose ids are not unique).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Final

_CPUINFO_SERIAL: Final = re.compile(r"^Serial\s*:\s*([0-9A-Fa-f]+)\s*$", re.M)
_NO_MAC: Final = "00:00:00:00:00:00"


def fingerprint(configured: str = "", root: Path = Path("/")) -> str:
    """What identifies this machine, as text naming its source."""
    if configured:
        return f"configured:{configured}"
    serial = _read(root / "proc/device-tree/serial-number").strip("\0 \n")
    if not serial:
        match = _CPUINFO_SERIAL.search(_read(root / "proc/cpuinfo"))
        serial = match.group(1) if match and match.group(1).strip("0") else ""
    if serial:
        return f"serial:{serial}"
    macs = sorted({mac for nic in (root / "sys/class/net").glob("*") if (nic / "device").exists()
                   if (mac := _read(nic / "address").strip().lower()) and mac != _NO_MAC})
    if macs:
        return "mac:" + ",".join(macs)
    machine_id = _read(root / "etc/machine-id").strip()
    return f"machine-id:{machine_id}" if machine_id else "unknown"


def machine_number(text: str) -> int:
    """A fingerprint as the 63-bit positive number the outbox keeps (its meta table holds integers)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1 or 1


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
