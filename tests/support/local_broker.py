"""A plain-TCP Mosquitto on a free loopback port: the broker a device's LAN would have, where
Zigbee2MQTT or Tasmota publish (field sensors read it; it is not the hub's mutual-TLS broker)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.harness import START_TIMEOUT, Proc
from tests.support.net import free_port


@dataclass
class LocalBroker:
    proc: Proc
    port: int
    folder: Path

    async def publish(self, topic: str, payload: str | bytes, *, retain: bool = False,
                      username: str | None = None, password: str | None = None) -> None:
        """One message with mosquitto_pub, as a LAN device would send it."""
        argv = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port), "-t", topic, "-q", "1"]
        if retain:
            argv.append("-r")
        if username is not None:
            argv += ["-u", username, "-P", password or ""]
        data = payload.encode() if isinstance(payload, str) else payload
        # -s reads the payload from stdin (any bytes); -n sends an empty one (clears a retained message).
        proc = await asyncio.create_subprocess_exec(*argv, "-s" if data else "-n", stdin=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(START_TIMEOUT):
            _, err = await proc.communicate(data)
        if proc.returncode != 0:
            raise AssertionError(f"mosquitto_pub {topic} failed: {err.decode(errors='replace')}")

    async def stop(self) -> None:
        await self.proc.stop()

    async def start(self) -> None:
        """Start again on the same port (after stop): a broker that comes back."""
        self.proc = await _start(self.folder, self.port)


async def _start(folder: Path, port: int) -> Proc:
    proc = await Proc(f"local-mosquitto:{port}", ["mosquitto", "-c", str(folder / "mosquitto.conf")]).start()
    await proc.wait_for(r"mosquitto version .* running")
    return proc


def tls_files(folder: Path, name: str = "lan") -> tuple[Path, Path, Path]:
    """A CA made now and a server certificate it signed for 127.0.0.1: (ca, cert, key) files."""
    from hub.pki.authority import Authority, cert_pem, key_pem  # the fleet CA code; any CA would do

    authority = Authority.create(name)
    key, cert = authority.issue_server(["127.0.0.1"])
    paths = folder / f"{name}-ca.crt", folder / f"{name}.crt", folder / f"{name}.key"
    for path, data in zip(paths, (cert_pem(authority.cert), cert_pem(cert), key_pem(key)), strict=True):
        path.write_bytes(data)
        path.chmod(0o644)  # the broker drops to the 'mosquitto' account when started as root
    return paths


@asynccontextmanager
async def local_broker(folder: Path, users: dict[str, str] | None = None,
                       tls: bool = False) -> AsyncIterator[LocalBroker]:
    """A Mosquitto on 127.0.0.1; with `users`, only they may connect (a password file); with
    `tls`, over TLS with a server certificate from a CA in `folder` (lan-ca.crt)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "persistence false", "log_dest stderr", "log_type all"]
    if tls:
        ca, cert, key = tls_files(folder)
        lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
    if users:
        passwords = folder / "passwords"
        passwords.touch(mode=0o644)
        for user, password in users.items():
            tool = shutil.which("mosquitto_passwd") or "mosquitto_passwd"
            proc = await asyncio.create_subprocess_exec(tool, "-b", str(passwords), user, password)
            async with asyncio.timeout(START_TIMEOUT):
                assert await proc.wait() == 0
        lines += ["allow_anonymous false", f"password_file {passwords}"]
    else:
        lines.append("allow_anonymous true")
    (folder / "mosquitto.conf").write_text("\n".join(lines) + "\n")
    broker = LocalBroker(await _start(folder, port), port, folder)
    try:
        yield broker
    finally:
        await broker.stop()
