"""A fault-injecting TCP proxy for partition tests.

    async with FaultProxy("127.0.0.1", broker_port) as proxy:
        ...connect clients to 127.0.0.1:proxy.port...
        proxy.partition()   # cable pulled: nothing passes, nothing is closed
        proxy.heal()        # cable back: connections from before are reset, new ones flow
        proxy.reset()       # every current connection gets an RST, like a broker crash

Semantics, chosen to look like the network and nothing else:

- `partition()` stops both directions at once. Nothing is read from either side any more,
  so bytes pile up in the kernel buffers and then TCP flow control stops the senders; no
  FIN or RST is sent to anyone, and an end of stream (or reset) arriving from one side is
  held back from the other too. New connections are accepted (the kernel completes the
  handshake of a listening socket anyway) and held without contacting the target, so a
  client's CONNECT goes unanswered and only its own timeouts notice. A chunk the proxy had
  already handed to a socket before `partition()` was called counts as sent before it.
- `heal()` resets (RST) every connection that exists at that moment, then forwards again
  for new connections. The alternative, resuming held connections, would deliver minutes
  old bytes into sessions that at least one end has usually abandoned by then (MQTT
  keepalive), and for held new connections would replay a stale CONNECT that can take over
  the session of the client's next, live connection. Resetting keeps every byte stream
  whole: no connection ever carries bytes from both sides of a partition, so nothing
  half-delivered is spliced onto a later stream, and clients reconnect cleanly.
- `reset()` resets every current connection, toward the client and the target, without
  changing the partition or black-hole state.
- `blackhole_new(True)` holds new connections as a partition would, while existing ones
  keep flowing; `blackhole_new(False)` resets the held ones and lets new ones through.
- A connection the target refuses (or that does not connect within `connect_timeout`) is
  reset toward the client: a broker that is down, seen through a proxy.

Observation: `stats()` (accepted, rejected, refused, resets, active, held, bytes each way),
`active`, `partitioned`, and `await wait_idle(timeout)` for "every connection has ended".

Bounds: at most `max_connections` connections at once (more are reset at accept and
counted in `rejected`); each direction holds at most one chunk in the proxy plus the
stream buffers (64 KiB each); all work is event driven. Every task is cancelled and awaited
on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Final

CHUNK: Final = 65536
_LINGER_RST: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close the connection under `writer` at once, with an RST rather than a FIN."""
    if writer is None:
        return
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing():
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


@dataclass(frozen=True)
class ProxyStats:
    accepted: int  # connections accepted from clients, held ones included
    rejected: int  # connections reset at accept: over max_connections
    refused: int  # connections reset because the target could not be reached
    resets: int  # connections reset by heal(), reset() or blackhole_new(False)
    active: int  # connections alive now
    held: int  # of which held (accepted during a partition or black hole, never forwarded)
    bytes_to_target: int  # bytes forwarded client → target
    bytes_to_client: int  # bytes forwarded target → client


class _Conn:
    __slots__ = ("client", "eofs", "held", "task", "upstream")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.held = False
        self.eofs = 0

    def kill(self) -> None:
        _rst(self.client)
        _rst(self.upstream)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class FaultProxy:
    """A TCP proxy on 127.0.0.1:`port` to `target_host`:`target_port` that injects faults."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0,
        max_connections: int = 1024, connect_timeout: float = 5.0,
    ) -> None:
        self.target_host, self.target_port = target_host, target_port
        self.host, self._want_port = host, port
        self.max_connections, self.connect_timeout = max_connections, connect_timeout
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._flowing = asyncio.Event()  # set unless partitioned
        self._flowing.set()
        self._blackhole = False
        self._idle = asyncio.Event()  # set when no connection is alive
        self._idle.set()
        self.accepted = self.rejected = self.refused = self.resets = 0
        self.bytes_to_target = self.bytes_to_client = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(
            self._on_accept, self.host, self._want_port, limit=CHUNK, backlog=128,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = [c.task for c in self._conns if c.task is not None]
        for conn in list(self._conns):
            conn.kill()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await server.wait_closed()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FaultProxy is not started: use `async with FaultProxy(...)`")
        return int(self._server.sockets[0].getsockname()[1])

    # -- controls ----------------------------------------------------------------------------

    @property
    def partitioned(self) -> bool:
        return not self._flowing.is_set()

    def partition(self) -> None:
        """Silently stop all forwarding; keep every connection open; hold new ones."""
        self._flowing.clear()

    def heal(self) -> None:
        """End a partition: reset every connection that lived through it, forward new ones."""
        if self.partitioned:
            self._kill(list(self._conns))
            self._flowing.set()

    def reset(self) -> None:
        """Reset (RST) every current connection, both sides; the state is unchanged."""
        self._kill(list(self._conns))

    def blackhole_new(self, on: bool = True) -> None:
        """Hold new connections (on), or reset the held ones and forward new ones (off)."""
        if self._blackhole and not on and not self.partitioned:
            self._kill([c for c in self._conns if c.held])
        self._blackhole = on

    def stats(self) -> ProxyStats:
        return ProxyStats(
            accepted=self.accepted, rejected=self.rejected, refused=self.refused, resets=self.resets,
            active=len(self._conns), held=sum(c.held for c in self._conns),
            bytes_to_target=self.bytes_to_target, bytes_to_client=self.bytes_to_client,
        )

    @property
    def active(self) -> int:
        return len(self._conns)

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no connection is alive (TimeoutError after `timeout` s)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    def _kill(self, conns: list[_Conn]) -> None:
        for conn in conns:
            if conn in self._conns:
                self.resets += 1
                conn.kill()

    # -- forwarding --------------------------------------------------------------------------

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._server is None or len(self._conns) >= self.max_connections:
            self.rejected += 1
            _rst(writer)
            return
        conn = _Conn(writer)
        self._conns.add(conn)
        conn.task = asyncio.get_running_loop().create_task(self._serve(conn, reader))
        # A task cancelled before its first step never runs its `finally`: forget it here.
        conn.task.add_done_callback(lambda _t: self._forget(conn))
        self._idle.clear()

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if not self._conns:
            self._idle.set()

    async def _serve(self, conn: _Conn, client_reader: asyncio.StreamReader) -> None:
        clean = False
        try:
            if self.partitioned or self._blackhole:
                conn.held = True
                await asyncio.Event().wait()  # until heal(), reset() or exit cancels it
            try:
                async with asyncio.timeout(self.connect_timeout):
                    up_reader, conn.upstream = await asyncio.open_connection(
                        self.target_host, self.target_port, limit=CHUNK,
                    )
            except (OSError, TimeoutError):
                self.refused += 1
                return
            results = await asyncio.gather(
                self._pipe(conn, client_reader, conn.upstream, to_target=True),
                self._pipe(conn, up_reader, conn.client, to_target=False),
            )
            clean = all(results)
        finally:
            self._forget(conn)
            if clean:
                conn.client.close()
                if conn.upstream is not None:
                    conn.upstream.close()
            else:
                conn.kill()

    async def _pipe(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_target: bool,
    ) -> bool:
        """Copy one direction; True when it ended with a clean end of stream."""
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                await self._flowing.wait()  # read just before a partition: hold it back
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return True
                writer.write(data)
                if to_target:
                    self.bytes_to_target += len(data)
                else:
                    self.bytes_to_client += len(data)
                await writer.drain()
        except OSError:  # reset, or the other side's transport is gone: mirror it as an RST
            conn.kill()
            return False
