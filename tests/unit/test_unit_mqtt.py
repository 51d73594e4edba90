"""MqttSession behaviour that needs no broker: cancellation and how TLS refusals are worded."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest

from edgefleet.errors import ConnectRefused
from edgefleet.mqtt.session import MqttSession, describe_tls_failure
from tests.support.harness import free_port


async def test_close_does_not_swallow_a_cancellation_of_its_caller() -> None:
    """A SIGTERM that lands while a session is closing must still stop the daemon."""
    session = MqttSession(client_id="x", host="127.0.0.1", port=1, tls=ssl.create_default_context())
    session._misc_task = asyncio.create_task(asyncio.sleep(3600))
    closing = asyncio.create_task(session.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing


async def test_paho_socket_callbacks_on_the_loop_thread_do_not_write_to_its_self_pipe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """paho registers a writer for every publish, on the loop's thread once connected. Each
    call_soon_threadsafe writes a byte to the loop's self-pipe: 2,000 sessions kept it full and a
    SIGTERM's wake-up byte, written there too, was lost. Only paho's connect thread may use it."""
    loop = asyncio.get_running_loop()
    handed: list[Callable[..., Any]] = []
    original = loop.call_soon_threadsafe

    def counting(callback: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Handle:
        handed.append(callback)
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    session = MqttSession(client_id="x", host="127.0.0.1", port=1, tls=ssl.create_default_context())
    mine, other = socket.socketpair()
    try:
        session._on_register_write(session._client, None, mine)
        assert handed == []
        assert loop.remove_writer(mine)  # registered at once, not later
        session._on_unregister_write(session._client, None, mine)
        assert handed == []

        await asyncio.to_thread(session._on_register_write, session._client, None, mine)  # as during connect
        assert [c.__name__ for c in handed if getattr(c, "__self__", None) is session] == ["_add_writer"]
        await asyncio.sleep(0)  # the loop runs what the thread handed it
        assert loop.remove_writer(mine)
    finally:
        mine.close()
        other.close()


async def test_nobody_listening_is_a_network_error_not_an_identity_error() -> None:
    session = MqttSession(client_id="x", host="127.0.0.1", port=free_port(), tls=ssl.create_default_context(),
                          connect_timeout=2.0)
    with pytest.raises(ConnectRefused) as refused:
        await session.connect()
    assert not refused.value.auth
    assert "cannot reach 127.0.0.1" in str(refused.value)


@pytest.mark.parametrize(
    ("openssl", "words", "auth"),
    [
        ("[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked", "revoked", True),
        ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "does not trust the CA", True),
        ("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required", "requires a client", True),
        ("[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE] sslv3 alert handshake failure", "client certificate", True),
        ("certificate verify failed: certificate is not yet valid", "is the clock right", False),
        ("certificate verify failed: certificate has expired", "is the clock right", False),
        ("certificate verify failed: unable to get local issuer certificate", "fleet CA", False),
        ("something nobody anticipated", "something nobody anticipated", False),
    ],
)
def test_tls_failures_are_worded_for_operators(openssl: str, words: str, auth: bool) -> None:
    sentence, is_auth = describe_tls_failure(openssl)
    assert words in sentence
    assert openssl.strip() in sentence  # the raw cause stays visible
    assert is_auth is auth
