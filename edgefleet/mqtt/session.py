"""One MQTT v5 connection over mutual TLS, driven by the asyncio event loop.

We drive paho ourselves instead of using aiomqtt 2.x because three facts decide
correctness (docs/mosquitto.md): aiomqtt ignores PUBACK reason codes, leaves a QoS 1
publish hanging when the connection drops, and acknowledges incoming messages before the
application has seen them. Here a refused publish raises PublishRefused, a dropped
connection fails every waiting publish with ConnectionLost, and `manual_ack` lets the
receiver acknowledge only after it has committed.

A session is one connection: reconnecting means a new session (and a new paho client, so
paho never re-sends stale messages from an old connection). `edgefleet.mqtt.link` loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefleet.errors import ConnectionLost, ConnectRefused, PublishRefused

MISC_INTERVAL: Final = 1.0  # paho's keepalive bookkeeping wants a tick about once a second
READ_HIGH_WATER: Final = 1000  # incoming messages queued before we stop reading the socket
READ_BURST: Final = 64  # TLS records drained per readable event before yielding to the loop
# CONNACK reason codes that mean "who you are" is the problem, not the network.
AUTH_REASONS: Final = {134, 135, 138, 140}  # bad credentials, not authorized, banned, bad auth

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """The files of one mutual-TLS identity."""

    ca: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int


def describe_tls_failure(text: str) -> tuple[str, bool]:
    """Turn an OpenSSL error text into (plain sentence, is it about our identity)."""
    lowered = text.lower()
    causes = [
        ("certificate revoked", "the broker says this certificate is revoked", True),
        ("certificate expired", "the broker says this certificate has expired", True),
        ("unknown ca", "the broker does not trust the CA that issued this certificate", True),
        ("certificate required", "the broker requires a client certificate and got none", True),
        ("bad certificate", "the broker rejected this certificate", True),
        ("certificate unknown", "the broker rejected this certificate", True),
        ("decrypt error", "the broker rejected this certificate", True),
        # TLS 1.2 has no "certificate required" alert: a missing or unacceptable client
        # certificate shows up as a bare handshake failure.
        ("handshake failure",
         "the broker refused the TLS handshake, usually over a missing or unacceptable client certificate",
         True),
        ("certificate is not yet valid",
         "the broker's certificate is not yet valid by this machine's clock: is the clock right?",
         False),
        ("certificate has expired",
         "the broker's certificate has expired by this machine's clock: is the clock right?", False),
        ("certificate verify failed",
         "the broker's certificate is not signed by this device's fleet CA (wrong ca.crt or wrong host?)",
         False),
        ("hostname mismatch", "the broker's certificate does not name the host we dialled", False),
    ]
    for needle, sentence, auth in causes:
        if needle in lowered:
            return f"{sentence} ({text.strip()})", auth
    return text.strip(), False


class MqttSession:
    """One MQTT v5 connection. Start with `async with`, or `connect()` then `close()`."""

    def __init__(
        self,
        *,
        client_id: str,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        keepalive: int = 30,
        will: Will | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
        connect_timeout: float = 10.0,
        manual_ack: bool = False,
        max_inflight: int = 100,
        username: str | None = None,
        password: str | None = None,
        max_packet: int = 0,
    ) -> None:
        """`tls` None is plain TCP: only for a broker on the device or its LAN (field sensors),
        never the hub's uplink. `max_packet` > 0 asks the broker not to send larger packets."""
        self.client_id = client_id
        self._host, self._port, self._keepalive = host, port, keepalive
        self._clean_start, self._session_expiry = clean_start, session_expiry
        self._connect_timeout = connect_timeout
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
        )
        if tls is not None:
            self._client.tls_set_context(tls)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._max_packet = max_packet
        self._client.connect_timeout = connect_timeout
        self._client.max_inflight_messages_set(max_inflight)
        self._max_inflight = max_inflight
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[str] = self._loop.create_future()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._pending_topics: dict[int, str] = {}
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self._sock: socket.socket | None = None
        self._reading_paused = False
        self._last_error = ""
        self._misc_task: asyncio.Task[None] | None = None
        self._install_callbacks()

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> MqttSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, handshake and wait for CONNACK; raise ConnectRefused or ConnectionLost."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self._session_expiry:
            props.SessionExpiryInterval = self._session_expiry
        # How many unacknowledged QoS 1 messages the broker may send us (else it starts at 20).
        props.ReceiveMaximum = self._max_inflight
        if self._max_packet:
            props.MaximumPacketSize = self._max_packet
        call = partial(
            self._client.connect, self._host, self._port, self._keepalive,
            clean_start=self._clean_start, properties=props,
        )
        try:
            async with asyncio.timeout(self._connect_timeout):
                # paho's connect does a blocking TCP connect and TLS handshake.
                await self._loop.run_in_executor(None, call)
                self._misc_task = asyncio.create_task(self._misc_loop(), name=f"mqtt-misc-{self.client_id}")
                await asyncio.shield(self._connack)
        except ssl.SSLCertVerificationError as exc:
            await self.close()
            sentence, auth = describe_tls_failure(exc.verify_message or str(exc))
            raise ConnectRefused(f"TLS: {sentence}", auth=auth) from None
        except ssl.SSLError as exc:
            await self.close()
            sentence, auth = describe_tls_failure(str(exc))
            raise ConnectRefused(f"TLS: {sentence}", auth=auth) from None
        except TimeoutError:
            await self.close()
            raise ConnectRefused(self._failure_text("no CONNACK within the connect timeout"), auth=False) from None
        except OSError as exc:
            await self.close()
            raise ConnectRefused(f"cannot reach {self._host}:{self._port}: {exc.strerror or exc}", auth=False) from None
        except BaseException:
            await self.close()
            raise

    async def close(self, *, with_will: bool = False) -> None:
        """Disconnect if connected, then release everything. The broker publishes the Last
        Will only if `with_will` (MQTT v5 reason 0x04), e.g. when a daemon stops."""
        if self._client.is_connected():
            reason = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message" if with_will
                                else "Normal disconnection")
            self._client.disconnect(reasoncode=reason)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(self._closed)
        self._teardown("closed by us")
        if self._misc_task is not None:
            self._misc_task.cancel()
            # asyncio.wait, not `await task` under suppress(CancelledError): that would also
            # swallow a cancellation aimed at our caller (a SIGTERM arriving mid-close).
            await asyncio.wait([self._misc_task])
            self._misc_task = None

    async def wait_closed(self) -> str:
        """Wait until the connection ends; return why."""
        return await asyncio.shield(self._closed)

    @property
    def is_connected(self) -> bool:
        return self._connack.done() and not self._connack.exception() and not self._closed.done()

    # --- operations -----------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish; for QoS 1 return only after a successful PUBACK."""
        if self._closed.done():
            raise ConnectionLost(f"not connected: {self._closed.result()}")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        future = self._pending[info.mid] = self._loop.create_future()
        self._pending_topics[info.mid] = topic
        await future

    async def subscribe(self, filters: list[tuple[str, int]], *, retain_as_published: bool = False) -> None:
        """Subscribe and wait for SUBACK. `retain_as_published`: messages keep the retain flag
        their publisher set (else the broker clears it on everything but retained copies)."""
        options = [(f, SubscribeOptions(qos=q, retainAsPublished=retain_as_published)) for f, q in filters]
        result, mid = self._client.subscribe(options)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionLost(f"subscribe failed: {paho.error_string(result)}")
        future = self._subacks[mid] = self._loop.create_future()
        codes = await future
        refused = [f"{f}: {c}" for (f, _), c in zip(filters, codes, strict=False) if c.is_failure]
        if refused:
            raise ConnectRefused(f"subscription refused: {', '.join(refused)}", auth=True)

    def ack(self, message: Message) -> None:
        """Acknowledge a message received with manual_ack, after it has been committed."""
        if message.qos and not self._closed.done():
            self._client.ack(message.mid, message.qos)

    def drain(self, limit: int) -> list[Message]:
        """Messages already received, up to `limit`, without waiting."""
        out: list[Message] = []
        while len(out) < limit and not self.messages.empty():
            out.append(self.messages.get_nowait())
        if self._reading_paused and self.messages.qsize() < READ_HIGH_WATER // 2:
            self._resume_reading()
        return out

    async def next_message(self) -> Message:
        message = await self.messages.get()
        if self._reading_paused and self.messages.qsize() < READ_HIGH_WATER // 2:
            self._resume_reading()
        return message

    # --- paho callbacks (all run on the event loop thread once connected) ------------

    def _install_callbacks(self) -> None:
        c = self._client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_log = self._on_log
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write

    def _threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        # paho's connect runs in an executor thread and opens the socket there: hand the call to
        # the loop. Once connected paho calls back on the loop's own thread (a writer registered
        # and unregistered for every publish): call at once. call_soon_threadsafe would write a
        # byte to the loop's self-pipe each time; thousands of sessions in a process (or a busy
        # hub) fill that pipe, and a signal's wake-up byte, written to the same pipe, is lost.
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._threadsafe(self._attach, sock)

    def _attach(self, sock: socket.socket) -> None:
        if self._closed.done():
            return
        self._sock = sock
        # Small packets (PUBACKs, acks, lease requests) must not wait for Nagle's delayed ACK.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.add_reader(sock, self._read)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._threadsafe(self._detach, sock)

    def _detach(self, sock: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._sock is sock:
            self._sock = None

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._threadsafe(self._add_writer, sock)

    def _add_writer(self, sock: socket.socket) -> None:
        if not self._closed.done() and sock.fileno() >= 0:
            self._loop.add_writer(sock, self._client.loop_write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._threadsafe(self._remove_writer, sock)

    def _remove_writer(self, sock: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _read(self) -> None:
        # TLS may hold decrypted records the socket no longer signals: drain them too.
        for _ in range(READ_BURST):
            if self._reading_paused or self._sock is None:
                return
            self._client.loop_read()
            sock = self._sock
            if not isinstance(sock, ssl.SSLSocket) or sock.pending() == 0:
                return
        self._loop.call_soon(self._read)

    def _pause_reading(self) -> None:
        if self._sock is not None and not self._reading_paused:
            self._reading_paused = True
            self._loop.remove_reader(self._sock)

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._sock is not None and not self._closed.done():
            self._loop.add_reader(self._sock, self._read)
            self._loop.call_soon(self._read)

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL)
            if self._client.loop_misc() == MQTTErrorCode.MQTT_ERR_NO_CONN:
                self._teardown(self._failure_text("connection lost"))
                return

    def _on_log(self, client: paho.Client, userdata: Any, level: int, text: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._last_error = text
            log.debug("paho %s: %s", self.client_id, text)

    def _failure_text(self, fallback: str) -> str:
        if not self._last_error:
            return fallback
        sentence, _ = describe_tls_failure(self._last_error)
        return f"{fallback}: {sentence}"

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(
                ConnectRefused(f"broker refused the connection: {reason}", auth=reason.value in AUTH_REASONS)
            )
        else:
            self._connack.set_result(None)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        # paho reports a dropped socket as 128 "Unspecified error"; the broker's own
        # DISCONNECT reasons (e.g. 142 session taken over) are worth showing as they are.
        if reason.value in (0, 128):
            text = "connection lost" if (reason.value or self._last_error) else "disconnected"
        else:
            text = f"the broker closed the connection: {reason}"
        self._teardown(self._failure_text(text))

    def _teardown(self, why: str) -> None:
        if self._sock is not None:
            self._detach(self._sock)
        if not self._closed.done():
            self._closed.set_result(why)
        if not self._connack.done():
            _, auth = describe_tls_failure(self._last_error)
            self._connack.set_exception(ConnectRefused(why, auth=auth))
            self._connack.exception()  # consumed here: nobody may be awaiting it yet
        for mid, future in list(self._pending.items()):
            if not future.done():
                future.set_exception(ConnectionLost(f"{why} before PUBACK ({self._pending_topics[mid]})"))
        self._pending.clear()
        self._pending_topics.clear()
        for sub in self._subacks.values():
            if not sub.done():
                sub.set_exception(ConnectionLost(f"{why} before SUBACK"))
        self._subacks.clear()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        # PUBACKs arrive through loop_read, always after publish() registered its future;
        # QoS 0 publishes have none.
        topic = self._pending_topics.pop(mid, "?")
        future = self._pending.pop(mid, None)
        if future is None or future.done():
            return
        if reason.is_failure:
            future.set_exception(PublishRefused(topic, str(reason), reason.value))
        else:
            future.set_result(None)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        future = self._subacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(codes)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.messages.put_nowait(Message(msg.topic, bytes(msg.payload), msg.qos, msg.retain, msg.mid))
        if self.messages.qsize() >= READ_HIGH_WATER:
            self._pause_reading()
