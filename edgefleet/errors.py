"""The shared layer's exception root; transient failures are kept apart from fatal ones.

The agent raises these too (`edge_agent.errors.AgentError` is this root); the hub raises only its
own `hub.errors.HubError`: it catches these where it calls shared code and raises its own."""

from __future__ import annotations

from pathlib import Path


class EdgefleetError(Exception):
    """Root of every error the shared layer and the agent raise on purpose."""


class ConfigError(EdgefleetError):
    """A configuration or profile that cannot be used; exit code 2. `path` is the file."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class TransientError(EdgefleetError):
    """Worth retrying: the broker is down, the network is partitioned."""


class ConnectRefused(TransientError):
    """The broker or TLS refused us; `auth` says whether our identity was the reason."""

    def __init__(self, message: str, *, auth: bool) -> None:
        super().__init__(message)
        self.auth = auth


class ConnectionLost(TransientError):
    """The MQTT connection dropped while an operation was waiting on it."""


class PublishRefused(EdgefleetError):
    """The broker answered a QoS 1 publish with a failure reason code (e.g. 135)."""

    def __init__(self, topic: str, reason: str, code: int) -> None:
        super().__init__(f"publish to {topic} refused by the broker: {reason} ({code})")
        self.topic = topic
        self.reason = reason
        self.code = code


class IdentityError(EdgefleetError):
    """A certificate or key file that cannot serve as the device's TLS identity; the message says why."""


class KeyGenerationFailed(TransientError):
    """Making a key and certificate request on the device failed (the helper process said why)."""


class AlreadyRunning(EdgefleetError):
    """Another process holds this identity's run lock (edgefleet.runtime.runlock); exit code 2."""

    def __init__(self, what: str, where: Path, pid: int | None) -> None:
        who = f"another {what} (pid {pid})" if pid else f"another {what}"
        super().__init__(f"{who} is running on {where}; stop it first")
        self.what, self.where, self.pid = what, where, pid
