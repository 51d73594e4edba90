"""A real pymodbus server (TCP or RTU on a serial device) for tests, benchmarks and the demo.

    python -m tests.support.modbus_server LAYOUT.json (--tcp HOST:PORT | --rtu DEVICE)

LAYOUT: {"units": {"1": {"coil": [true, false], "discrete": [...], "holding": [1, 2], "input": [...]}},
"dead": [7]}. Each table holds values from address 0. A unit in "dead" is served like the others
but its answers are dropped before they are sent: to the client it is a slave that never answers.
Prints "modbus server ready" once it listens; runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

READY = "modbus server ready"


def device(unit: int, tables: dict[str, list[Any]]) -> SimDevice:
    def block(name: str, kind: DataType) -> list[SimData]:
        values = tables.get(name) or ([False] if kind == DataType.BITS else [0])
        return [SimData(0, values=[bool(v) for v in values] if kind == DataType.BITS else [int(v) for v in values],
                        datatype=kind)]

    # The non-shared form: (coils, discrete inputs, holding registers, input registers).
    return SimDevice(id=unit, simdata=(block("coil", DataType.BITS), block("discrete", DataType.BITS),
                                       block("holding", DataType.REGISTERS), block("input", DataType.REGISTERS)))


def silencer(dead: set[int], unit_at: int) -> Any:
    """A trace_packet hook that drops every answer of a dead unit (the unit id is byte `unit_at`)."""
    def trace(sending: bool, data: bytes) -> bytes:
        if sending and len(data) > unit_at and data[unit_at] in dead:
            return b""
        return data
    return trace


async def serve(layout: dict[str, Any], tcp: str | None, rtu: str | None) -> None:
    devices = [device(int(unit), tables) for unit, tables in layout["units"].items()]
    dead = {int(u) for u in layout.get("dead", [])}
    server: ModbusTcpServer | ModbusSerialServer
    if tcp is not None:
        host, port = tcp.rsplit(":", 1)
        server = ModbusTcpServer(devices, address=(host, int(port)), ignore_missing_devices=True,
                                 trace_packet=silencer(dead, 6))  # MBAP header: unit id is byte 6
    else:
        assert rtu is not None
        server = ModbusSerialServer(devices, framer=FramerType.RTU, port=rtu, baudrate=layout.get("baudrate", 19200),
                                    ignore_missing_devices=True, trace_packet=silencer(dead, 0))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await server.serve_forever(background=True)  # returns once it listens; raises if it cannot
    print(READY, flush=True)
    await stop.wait()
    await server.shutdown()


def main() -> None:
    logging.basicConfig(level=logging.CRITICAL)
    parser = argparse.ArgumentParser()
    parser.add_argument("layout", type=Path)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp")
    where.add_argument("--rtu")
    args = parser.parse_args()
    asyncio.run(serve(json.loads(args.layout.read_text()), args.tcp, args.rtu))
    sys.exit(0)


if __name__ == "__main__":
    main()
