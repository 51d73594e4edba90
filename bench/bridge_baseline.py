"""P2 baseline: a backlog drained through a per-device Mosquitto bridged (mTLS) to a central one.

The usual alternative to our agent is a Mosquitto on each device, bridged to the central
broker and used as the buffer (docs/mosquitto.md, "The broker is not a durable queue"). This measures it on the
same machine and backlog as P2:

1. a throw-away CA (hub.pki.authority.Authority) with a central server certificate and client
   certificates for the bridge ('edge-bridge') and the subscriber ('bench-sub');
2. a central Mosquitto configured like ours (mTLS, require_certificate,
   use_identity_as_username, an ACL: the bridge writes bench/edge-bridge/#, the subscriber
   reads bench/#), started once so the subscriber leaves a persistent session with its
   subscription, then stopped (it saves its database);
3. an edge Mosquitto with a plain loopback listener and a bridge to the central broker's
   port, where nothing listens now: cleansession false, notifications false (true makes a
   broker with a per-device ACL close the bridge), max_queued_messages 0 (the default 1000
   silently drops the rest of a backlog), `topic bench/edge-bridge/# out 1`;
4. the backlog: N QoS 1 messages of BYTES bytes published to the edge by a pipelined
   MQTT 3.1.1 publisher with a bounded window (each payload starts with its zero-padded
   index); every PUBACK is counted;
5. the central broker is started again: the bridge connects (restart_timeout 1 1) and the
   subscriber (mosquitto_sub, QoS 1, mTLS) gets the messages through its restored session.
   Drain time runs from the central broker's log line for the bridge's connection to the
   last message at the subscriber; every index is checked.

    python bench/bridge_baseline.py --messages 100000 --payload 100

prints one line per figure and then the figures as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import pwd
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from edgefleet.runtime.files import write_atomic
from hub.pki.authority import Authority, cert_pem, key_pem
from tests.support.net import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BRIDGE_CN = "edge-bridge"
SUB_CN = "bench-sub"
TOPIC = f"bench/{BRIDGE_CN}/data"
START_TIMEOUT = 15.0
STALL = 20.0  # no message at the subscriber for this long: what is missing is lost
MB = 1024 * 1024


class Child:
    """A child process; its stderr lines (or, with `merge`, its whole output) are kept with
    the monotonic time they were read. bench/p2_drain.py uses it for the hub and the agent."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name, self.argv = name, argv
        self.lines: list[tuple[float, str]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self.stdout: asyncio.StreamReader | None = None

    async def start(self, stdout: bool = False, merge: bool = False) -> Child:
        """`stdout`: keep stdout as a stream for the caller; `merge`: read stdout and stderr as one."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout or merge else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.STDOUT if merge else asyncio.subprocess.PIPE,
            start_new_session=True, limit=1 << 20,
        )
        self.stdout = None if merge else self.proc.stdout
        self._reader = asyncio.create_task(self._read(self.proc.stdout if merge else self.proc.stderr))
        return self

    async def _read(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        async for raw in stream:
            async with self._changed:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    def first(self, pattern: str, after: int = 0) -> float | None:
        """The time the first line matching `pattern` (from line `after` on) was read, if yet."""
        regex = re.compile(pattern)
        return next((t for t, line in self.lines[after:] if regex.search(line)), None)

    async def wait_for(self, pattern: str, within: float = START_TIMEOUT, after: int = 0) -> float:
        """The time the first line matching `pattern` (from line `after` on) was read."""
        try:
            async with asyncio.timeout(within), self._changed:
                while (when := self.first(pattern, after)) is None:
                    if self._reader is not None and self._reader.done():
                        break
                    await self._changed.wait()
        except TimeoutError:
            when = None
        if when is None:
            raise RuntimeError(f"{self.name}: no line matching {pattern!r} within {within} s\n{self.tail()}")
        return when

    def tail(self, n: int = 20) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for _, line in self.lines if regex.search(line))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        async with asyncio.timeout(within):
            code = await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        return code

    def signal(self, sig: int) -> None:
        # os.kill, not send_signal: Popen.send_signal polls, reaping the child behind
        # asyncio's watcher ("Unknown child process pid").
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    async def stop(self, within: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.signal(signal.SIGCONT)  # a stopped (SIGSTOP) child cannot act on SIGTERM
            self.signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(within):
                    await self.proc.wait()
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        return self.proc.returncode


def broker_owner() -> tuple[int, int] | None:
    """Who Mosquitto runs as: it drops from root to 'mosquitto' when started as root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def check_reachable(workdir: Path, owner: tuple[int, int] | None) -> None:
    """Mosquitto drops to its own account: every directory above `workdir` must let it in."""
    if owner is None:
        return
    for directory in [workdir.resolve(), *workdir.resolve().parents]:
        st = directory.stat()
        if st.st_uid != owner[0] and not st.st_mode & 0o001:
            raise RuntimeError(f"Mosquitto runs as 'mosquitto' and cannot enter {directory}: chmod o+x it "
                               "(a temp dir with mode 0711 will do) or use another workdir")


def make_pki(d: Path, owner: tuple[int, int] | None) -> None:
    ca = Authority.create("bench")
    day = dt.timedelta(days=1)
    write_atomic(d / "ca.crt", cert_pem(ca.cert), 0o644)
    key, cert = ca.issue_server(["127.0.0.1", "localhost"])
    write_atomic(d / "central.crt", cert_pem(cert), 0o644)
    write_atomic(d / "central.key", key_pem(key), 0o600, owner)
    for name, cn, key_owner in (("bridge", BRIDGE_CN, owner), ("sub", SUB_CN, None)):
        ckey, ccert = ca.issue_client(cn, day)
        assert ckey is not None
        write_atomic(d / f"{name}.crt", cert_pem(ccert), 0o644)
        write_atomic(d / f"{name}.key", key_pem(ckey), 0o600, key_owner)


def data_dir(path: Path, owner: tuple[int, int] | None) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(path, *owner)
    return path


COMMON = [
    "per_listener_settings false",
    "log_dest stderr",  # 2.0.11 block-buffers stdout when it is not a terminal
    "log_type error",
    "log_type warning",
    "log_type notice",
    "log_type information",
    "connection_messages true",
    "max_queued_messages 0",  # the default 1000 drops a backlog's excess silently
]


def central_conf(d: Path, port: int, inflight: int | None, owner: tuple[int, int] | None) -> str:
    lines = [
        *COMMON,
        "allow_anonymous false",
        f"acl_file {d / 'central.acl'}",
        "persistence true",  # keeps the subscriber's session across the restart
        f"persistence_location {data_dir(d / 'central-data', owner)}/",
        "autosave_interval 3600",
        *([f"max_inflight_messages {inflight}"] if inflight else []),
        f"listener {port} 127.0.0.1",
        f"cafile {d / 'ca.crt'}",
        f"certfile {d / 'central.crt'}",
        f"keyfile {d / 'central.key'}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
    ]
    return "\n".join(lines) + "\n"


def edge_conf(
    d: Path, port: int, central_port: int, protocol: str, inflight: int | None,
    persistence: bool, owner: tuple[int, int] | None,
) -> str:
    lines = [
        *COMMON,
        "allow_anonymous true",
        "sys_interval 1",
        *([f"max_inflight_messages {inflight}"] if inflight else []),
    ]
    if persistence:  # a snapshot every autosave_interval (default 1800 s): see NOTES
        lines += ["persistence true", f"persistence_location {data_dir(d / 'edge-data', owner)}/"]
    else:
        lines += ["persistence false"]
    lines += [
        f"listener {port} 127.0.0.1",
        "",
        "connection central",
        f"address 127.0.0.1:{central_port}",
        f"bridge_protocol_version {protocol}",
        f"bridge_cafile {d / 'ca.crt'}",
        f"bridge_certfile {d / 'bridge.crt'}",
        f"bridge_keyfile {d / 'bridge.key'}",
        "bridge_tls_version tlsv1.2",
        "bridge_insecure false",
        f"remote_clientid {BRIDGE_CN}",
        "cleansession false",  # true stopped forwarding after a reconnect (NOTES)
        "notifications false",  # true: the central ACL denies the state topic, bridge is closed
        # 2.0.11: a single value keeps the default jittered 5..30 s backoff (measured: retries
        # 6, 12, 6, 11, 24, 31 s apart); base and cap both 1 retry about every 2 s.
        "restart_timeout 1 1",
        "keepalive_interval 60",
        f"topic bench/{BRIDGE_CN}/# out 1",
    ]
    return "\n".join(lines) + "\n"


def sub_argv(d: Path, port: int, *extra: str) -> list[str]:
    return [
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5",
        "--cafile", str(d / "ca.crt"), "--cert", str(d / "sub.crt"), "--key", str(d / "sub.key"),
        "-i", SUB_CN, "-c", "-x", "86400", "-q", "1", "-t", "bench/#", *extra,
    ]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def publish_backlog(port: int, messages: int, payload: int, width: int, window: int) -> int:
    """Publish `messages` QoS 1 messages over plain MQTT 3.1.1 with at most `window` unacknowledged.

    A minimal pipelined publisher: the PUBLISH packets only differ in packet id and index, so
    Python spends well under a microsecond on each. Returns the number of PUBACKs received.
    (`mosquitto_pub -l -q 1` from 2.0.11 exits 0 having sent only about a third of 100,000
    lines, so it cannot build a backlog.)
    """
    if not 1 <= window <= 60_000:
        raise ValueError("window must be 1..60000 (packet ids must not wrap onto unacknowledged ones)")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        client_id = b"bench-pub"
        variable = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
        writer.write(b"\x10" + _varint(len(variable)) + variable)
        connack = await reader.readexactly(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"edge broker refused the publisher: CONNACK {connack.hex()}")
        topic = TOPIC.encode()
        prefix = b"\x32" + _varint(2 + len(topic) + 2 + payload) + len(topic).to_bytes(2, "big") + topic
        pad = b"x" * (payload - width)
        acked = 0
        room = asyncio.Event()
        room.set()

        async def read_acks() -> None:
            nonlocal acked
            buffer = b""
            while acked < messages:
                chunk = await reader.read(65536)
                if not chunk:
                    raise RuntimeError(f"edge broker closed the publisher after {acked} PUBACKs")
                buffer += chunk
                whole = len(buffer) // 4 * 4
                if buffer[0:whole:4] != b"\x40" * (whole // 4):
                    raise RuntimeError(f"unexpected packet from the edge broker: {buffer[:8].hex()}")
                acked += whole // 4
                buffer = buffer[whole:]
                room.set()

        acks = asyncio.create_task(read_acks())
        try:
            sent = 0
            while sent < messages:
                await room.wait()
                room.clear()
                if acks.done():
                    break
                batch = min(window - (sent - acked), messages - sent)
                if batch <= 0:
                    continue
                writer.write(b"".join(
                    prefix + ((i % 65535) + 1).to_bytes(2, "big") + b"%0*d" % (width, i) + pad
                    for i in range(sent, sent + batch)
                ))
                sent += batch
                await writer.drain()
            await acks
        finally:
            acks.cancel()
            await asyncio.gather(acks, return_exceptions=True)
        writer.write(b"\xe0\x00")  # DISCONNECT
        await writer.drain()
        return acked
    finally:
        writer.close()


def check_indices(path: Path, messages: int, width: int) -> tuple[int, int]:
    """(lines received, distinct valid indices) in the subscriber's output."""
    seen = bytearray(messages)
    lines = 0
    with path.open("rb") as f:
        for line in f:
            lines += 1
            with contextlib.suppress(ValueError):
                i = int(line[:width])
                if 0 <= i < messages:
                    seen[i] = 1
    return lines, sum(seen)


async def collect(
    child: Child, out: Path, messages: int, within: float, stall: float,
) -> tuple[float | None, float | None]:
    """Copy the subscriber's output to `out` until `messages` lines arrived; give up after
    `within` s in all or `stall` s without output. (First, last) output times."""
    assert child.stdout is not None
    first = last = None
    count = 0
    with out.open("wb") as f, contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while count < messages:
                async with asyncio.timeout(stall):
                    chunk = await child.stdout.read(1 << 20)
                if not chunk:
                    break
                now = time.monotonic()
                first = first or now
                f.write(chunk)
                n = chunk.count(b"\n")
                if n:
                    last, count = now, count + n
    return first, last


async def edge_stored(port: int, expect: int) -> int | None:
    """The edge broker's own count of stored messages ($SYS, refreshed every second), once it
    reaches `expect` or after 6 s: a cross-check that the backlog sits in the edge broker."""
    child = await Child("sys", [
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-W", "6",
        "-t", "$SYS/broker/store/messages/count",
    ]).start(stdout=True)
    value = None
    try:
        assert child.stdout is not None
        async with asyncio.timeout(8):
            async for line in child.stdout:
                with contextlib.suppress(ValueError):
                    value = int(line)
                if value is not None and value >= expect:
                    break
    except TimeoutError:
        pass
    finally:
        await child.stop()
    return value


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / MB, 1)


async def run_bridge_baseline(
    messages: int, payload: int, workdir: Path, *, protocol: str = "mqttv50",
    inflight: int | None = None, edge_persistence: bool = False, pub_window: int = 1000,
    phase_limit: float | None = None,
) -> dict[str, Any]:
    """Build a backlog of `messages` x `payload` bytes on a bridged edge Mosquitto, drain it.

    Every wait is bounded: broker starts by START_TIMEOUT, the backlog and the drain each by
    `phase_limit` (default 60 s + 1 s per 2,000 messages), a stalled drain by STALL.
    """
    if messages < 1:
        raise ValueError("messages must be at least 1")
    budget = phase_limit if phase_limit is not None else 60.0 + messages / 2_000
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o711)
    owner = broker_owner()
    check_reachable(workdir, owner)
    make_pki(workdir, owner)
    central_port = free_port()
    edge_port = free_port((central_port,))
    write_atomic(workdir / "central.acl",
                 f"user {BRIDGE_CN}\ntopic write bench/{BRIDGE_CN}/#\n\nuser {SUB_CN}\ntopic read bench/#\n".encode(),
                 0o644)
    write_atomic(workdir / "central.conf", central_conf(workdir, central_port, inflight, owner).encode(), 0o644)
    write_atomic(workdir / "edge.conf", edge_conf(workdir, edge_port, central_port, protocol, inflight,
                                                  edge_persistence, owner).encode(), 0o644)
    width = len(str(messages - 1))
    if payload < width:
        raise ValueError(f"payload must be at least {width} bytes to hold the message index")
    received_file = workdir / "received.txt"
    listening = r"mosquitto version \S+ running"  # logged once every listener is open
    children: list[Child] = []

    async def spawn(name: str, argv: list[str], stdout: bool = False) -> Child:
        child = await Child(name, argv).start(stdout=stdout)
        children.append(child)
        return child

    figures: dict[str, Any] = {"messages": messages, "payload_bytes": payload, "bridge_protocol": protocol,
                               "max_inflight_messages": inflight or "default (20)",
                               "edge_persistence": edge_persistence}
    try:
        # The subscriber's persistent session, so nothing the bridge forwards finds no one.
        central = await spawn("central", [MOSQUITTO, "-c", str(workdir / "central.conf")])
        await central.wait_for(listening)
        setup = await spawn("sub-setup", sub_argv(workdir, central_port, "-E"))
        if await setup.wait(START_TIMEOUT) != 0:
            raise RuntimeError(f"subscriber could not subscribe:\n{setup.tail()}\n{central.tail()}")
        await central.stop()

        # The edge, its bridge pointing at a port where nothing listens yet.
        edge = await spawn("edge", [MOSQUITTO, "-c", str(workdir / "edge.conf")])
        await edge.wait_for(listening)
        await edge.wait_for(r"Connecting bridge")
        figures["edge_rss_idle_mb"] = rss_mb(edge.pid)

        t0 = time.monotonic()
        async with asyncio.timeout(budget):
            acked = await publish_backlog(edge_port, messages, payload, width, pub_window)
        t_built = time.monotonic()
        figures["backlog_pubacks"] = acked
        figures["backlog_build_s"] = round(t_built - t0, 3)
        figures["backlog_build_msgs_per_s"] = round(messages / (t_built - t0))
        figures["edge_stored_messages"] = await edge_stored(edge_port, messages)
        figures["edge_rss_backlog_mb"] = rss_mb(edge.pid)

        # Central comes up: the bridge connects and drains the backlog.
        t_start = time.monotonic()
        central = await spawn("central", [MOSQUITTO, "-c", str(workdir / "central.conf")])
        await central.wait_for(listening)
        sub = await spawn("sub", sub_argv(workdir, central_port), stdout=True)
        collecting = asyncio.create_task(collect(sub, received_file, messages, budget, STALL))
        try:
            t_bridge = await central.wait_for(rf"New (client|bridge) connected from \S+ as {BRIDGE_CN}\b",
                                              within=START_TIMEOUT)
        except RuntimeError:
            collecting.cancel()
            raise
        first, last = await collecting
        await sub.stop()
        figures["bridge_connect_after_central_start_s"] = round(t_bridge - t_start, 3)
        lines, unique = check_indices(received_file, messages, width)
        figures["received"] = lines
        figures["missing"] = messages - unique
        figures["duplicates"] = lines - unique
        if first is not None and last is not None:
            figures["first_message_after_bridge_connect_s"] = round(first - t_bridge, 3)
            figures["drain_s"] = round(last - t_bridge, 3)
            figures["drain_msgs_per_s"] = round(unique / max(last - t_bridge, 1e-6))
        else:
            figures["drain_s"] = None
        figures["edge_rss_after_drain_mb"] = rss_mb(edge.pid)
        figures["edge_drop_log_lines"] = edge.count(r"(?i)dropp")
        figures["bridge_connects"] = central.count(rf"connected from \S+ as {BRIDGE_CN}\b")
        if figures["missing"]:
            figures["note"] = f"{figures['missing']} messages had not reached central after {STALL:.0f} s of silence"
        return figures
    finally:
        for child in reversed(children):
            await child.stop()
        received_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=100, help="payload bytes per message")
    parser.add_argument("--protocol", choices=["mqttv50", "mqttv311"], default="mqttv50",
                        help="bridge_protocol_version")
    parser.add_argument("--inflight", type=int, default=None,
                        help="max_inflight_messages on both brokers (Mosquitto's default: 20)")
    parser.add_argument("--edge-persistence", action="store_true",
                        help="persistence true on the edge (default autosave_interval 1800)")
    parser.add_argument("--pub-window", type=int, default=1000, help="publisher's unacknowledged QoS 1 window")
    parser.add_argument("--phase-limit", type=float, default=None,
                        help="bound for the backlog and for the drain, seconds (default 60 + N/2000)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bridge-baseline-"))
    try:
        figures = asyncio.run(run_bridge_baseline(
            args.messages, args.payload, workdir, protocol=args.protocol, inflight=args.inflight,
            edge_persistence=args.edge_persistence, pub_window=args.pub_window, phase_limit=args.phase_limit,
        ))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(json.dumps({"bench": "bridge_baseline", **figures}))
    return 1 if figures.get("missing") else 0


if __name__ == "__main__":
    sys.exit(main())
