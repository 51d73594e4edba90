"""Real pymodbus servers in their own processes (tests/support/modbus_server.py), and socat
pseudo-terminal pairs for RTU, for tests, benchmarks and the demo (no pytest here)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tests.support.harness import Proc
from tests.support.modbus_server import READY
from tests.support.net import free_port

SOCAT_START_TIMEOUT = 10.0  # socat makes two ptys and links; a loaded machine is slow to fork


class ModbusServer:
    """`python -m tests.support.modbus_server` on a TCP port or a serial device; stop() and start() again."""

    def __init__(self, workdir: Path, layout: dict[str, Any], *, rtu: Path | None = None, name: str = "modbus") -> None:
        self.layout_path = workdir / f"{name}-layout.json"
        self.layout_path.write_text(json.dumps(layout), encoding="utf-8")
        self.rtu = rtu
        self.port = free_port() if rtu is None else 0
        self.name = name
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"rtu://{self.rtu}?baudrate=19200" if self.rtu is not None else f"tcp://127.0.0.1:{self.port}"

    async def start(self) -> ModbusServer:
        where = ["--rtu", str(self.rtu)] if self.rtu is not None else ["--tcp", f"127.0.0.1:{self.port}"]
        self.proc = await Proc(self.name, [sys.executable, "-m", "tests.support.modbus_server",
                                           str(self.layout_path), *where]).start()
        await self.proc.wait_for(READY)
        return self

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: the device loses power (no FIN is guaranteed to reach the client)."""
        if self.proc is not None:
            self.proc.signal(9)

    async def __aenter__(self) -> ModbusServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class SerialPair:
    """Two linked pseudo-terminals (`a` for the server, `b` for the client) made by socat."""

    def __init__(self, workdir: Path) -> None:
        self.a = workdir / "tty-server"
        self.b = workdir / "tty-client"
        self.proc: Proc | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("socat") is not None

    async def __aenter__(self) -> SerialPair:
        self.proc = await Proc("socat", ["socat", "-d", "-d", f"pty,raw,echo=0,link={self.a}",
                                         f"pty,raw,echo=0,link={self.b}"]).start()
        await self.proc.wait_for("starting data transfer loop", timeout=SOCAT_START_TIMEOUT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            await self.proc.stop()


async def wait_for(predicate: Any, what: str, timeout: float, event: asyncio.Event | None = None) -> None:
    """Until `predicate()` holds: woken by `event` when given, else checked every 0.1 s; bounded."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                if event is not None:
                    event.clear()
                    await event.wait()
                else:
                    await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None
