"""The fault proxy itself, against a tiny echo server: flow, partition, heal, reset."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.harness import free_port

QUIET = 0.3  # how long "nothing arrives" is watched for


class EchoServer:
    """Echoes every byte back; can drop all its connections (FIN) on request."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.received = 0
        self.eofs = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> EchoServer:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
            self.eofs += 1
        except OSError:
            pass
        finally:
            writer.close()

    def close_all(self) -> None:
        for writer in self.writers:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.close_all()
        async with asyncio.timeout(5):
            await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = await EchoServer().start()
    yield server
    await server.stop()


async def open_client(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(5):
        return await asyncio.open_connection("127.0.0.1", proxy.port)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    async with asyncio.timeout(5):
        assert await reader.readexactly(len(data)) == data


async def nothing_arrives(reader: asyncio.StreamReader) -> None:
    """Neither data nor an end of stream nor a reset within QUIET seconds."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(QUIET):
            await reader.read(1)


async def closed_abruptly(reader: asyncio.StreamReader) -> None:
    """The connection ends (reset or end of stream) within 5 s, with no data first."""
    try:
        async with asyncio.timeout(5):
            assert await reader.read(1) == b""
    except ConnectionResetError:
        pass


async def test_data_flows_both_ways_and_is_counted(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        await roundtrip(reader, writer, b"hello")
        big = bytes(range(256)) * 4096  # 1 MiB: more than any buffer on the way
        await roundtrip(reader, writer, big)
        stats = proxy.stats()
        assert stats.accepted == 1
        assert stats.active == 1
        assert stats.bytes_to_target == stats.bytes_to_client == 5 + len(big)
        writer.write_eof()  # a clean end of stream travels through and back
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        await proxy.wait_idle(5)
        assert echo.eofs == 1


async def test_partition_is_silent_and_closes_nothing(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        await roundtrip(reader, writer, b"before")
        received = echo.received
        proxy.partition()
        writer.write(b"during")
        await nothing_arrives(reader)
        assert echo.received == received  # the target saw nothing either
        assert not writer.is_closing()
        # The target closing its side is not passed on: no FIN reaches the client.
        echo.close_all()
        await nothing_arrives(reader)
        # A new connection is accepted by the kernel but goes nowhere.
        reader2, writer2 = await open_client(proxy)
        writer2.write(b"new")
        await nothing_arrives(reader2)
        assert echo.received == received
        assert proxy.stats().held == 1
        assert proxy.stats().active == 2
        writer.close()
        writer2.close()


async def test_heal_resets_old_connections_and_forwards_new_ones(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        await roundtrip(reader, writer, b"before")
        proxy.partition()
        writer.write(b"stale")
        held_reader, held_writer = await open_client(proxy)
        held_writer.write(b"stale too")
        await nothing_arrives(reader)
        proxy.heal()
        # Streams that lived through the partition end; their held bytes never arrive.
        await closed_abruptly(reader)
        await closed_abruptly(held_reader)
        assert proxy.stats().resets == 2
        reader3, writer3 = await open_client(proxy)
        await roundtrip(reader3, writer3, b"after")
        assert echo.received == len(b"before") + len(b"after")
        for w in (writer, held_writer, writer3):
            w.close()


async def test_reset_is_an_rst_to_the_client(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        await roundtrip(reader, writer, b"ping")
        proxy.reset()
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
        writer.close()
        # The proxy itself goes on: the next connection flows.
        reader2, writer2 = await open_client(proxy)
        await roundtrip(reader2, writer2, b"again")
        writer2.close()


async def test_reset_during_partition_still_resets(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        await roundtrip(reader, writer, b"ping")
        proxy.partition()
        proxy.reset()
        await closed_abruptly(reader)
        writer.close()
        assert proxy.partitioned


async def test_blackhole_new_holds_only_new_connections(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        proxy.blackhole_new(True)
        held_reader, held_writer = await open_client(proxy)
        held_writer.write(b"lost")
        await roundtrip(reader, writer, b"old one flows")
        await nothing_arrives(held_reader)
        proxy.blackhole_new(False)
        await closed_abruptly(held_reader)
        reader3, writer3 = await open_client(proxy)
        await roundtrip(reader3, writer3, b"new flows")
        assert echo.received == len(b"old one flows") + len(b"new flows")
        for w in (writer, held_writer, writer3):
            w.close()


async def test_unreachable_target_resets_the_client() -> None:
    async with FaultProxy("127.0.0.1", free_port(), connect_timeout=2.0) as proxy:
        reader, writer = await open_client(proxy)
        await closed_abruptly(reader)
        writer.close()
        assert proxy.stats().refused == 1


async def test_connection_limit_is_enforced(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port, max_connections=2) as proxy:
        clients = [await open_client(proxy) for _ in range(2)]
        for reader, writer in clients:
            await roundtrip(reader, writer, b"x")
        reader, writer = await open_client(proxy)
        await closed_abruptly(reader)
        writer.close()
        assert proxy.stats().rejected == 1
        for _, w in clients:
            w.close()


async def test_exit_cleans_up_every_task(echo: EchoServer) -> None:
    before = asyncio.all_tasks()
    writers = []
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        await roundtrip(reader, writer, b"x")
        writers.append(writer)
        proxy.partition()
        writers.append((await open_client(proxy))[1])
        await asyncio.sleep(0.05)
        assert proxy.active == 2
    assert proxy.active == 0
    leftover = [t for t in asyncio.all_tasks() - before if not t.done()]
    # Only the echo server's own handlers may remain; none of the proxy's.
    assert not [t for t in leftover if "_serve" in repr(t.get_coro()) or "_pipe" in repr(t.get_coro())]
    await closed_abruptly(reader)
    for w in writers:
        w.close()
