"""A broker port that something else holds: `edge-hub run` stops at once and says who holds it;
`edge-hub init` warns."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hub.broker import port_holder, port_taken
from tests.support.harness import HUB, HubDir, Proc, run_cli
from tests.support.net import free_port

pytestmark = pytest.mark.integration

GIVE_UP_TIMEOUT = 30.0  # edge-hub run must have exited by then; before the fix it never did


@pytest.fixture
def squatter() -> Iterator[socket.socket]:
    """A listener of this test process on a free loopback port, as another service would hold it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield sock


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def _me() -> str:
    return f"{psutil.Process().name()} (pid {os.getpid()})"


async def test_run_exits_1_in_one_sentence_when_the_broker_port_is_taken(hub_dir: HubDir, workdir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", hub_dir.port))
        sock.listen()
        hub = await Proc("hub", [HUB, "run", "--dir", str(hub_dir.dir)]).start()
        try:
            assert hub.proc is not None
            async with asyncio.timeout(GIVE_UP_TIMEOUT):
                code = await hub.proc.wait()
        finally:
            await hub.stop()  # collects its output; before the fix it ran (and restarted its broker) forever
    err = "\n".join(hub.lines)
    lines = err.strip().splitlines()
    assert code == 1, err
    assert lines[-1] == (f"edge-hub: the broker cannot listen on 127.0.0.1 port {hub_dir.port}: {_me()} already "
                         "uses it; stop that, or set another broker.port in hub.toml (and in the devices' "
                         "agent.toml)"), err
    assert "restarting" not in err, err
    assert "TLS" not in err, err  # the hub's own client never dialled whatever holds the port
    assert not (hub_dir.dir / "run" / "mosquitto.pid").exists()


async def test_init_warns_when_the_broker_port_is_taken(workdir: Path, squatter: socket.socket) -> None:
    port = _port(squatter)
    code, out, err = await run_cli(HUB, "init", "--dir", str(workdir / "hub"), "--region", "test",
                                   "--port", str(port), "--host", "127.0.0.1")
    assert code == 0, err
    assert f"port {port} on 127.0.0.1 is already used by {_me()}" in err, err
    assert "created" in out


async def test_init_is_quiet_when_the_port_is_free(workdir: Path) -> None:
    code, _, err = await run_cli(HUB, "init", "--dir", str(workdir / "hub"), "--region", "test",
                                 "--port", str(free_port()), "--host", "127.0.0.1")
    assert code == 0, err
    assert "already used" not in err, err


def test_port_taken_means_a_listener_holds_it(squatter: socket.socket) -> None:
    assert port_taken("127.0.0.1", _port(squatter))
    assert port_holder(_port(squatter)) == _me()
    assert not port_taken("127.0.0.1", free_port())
