"""The hub's exception root. The hub raises only these: where it calls shared code
(edgefleet), it catches the shared errors and raises the hub error they mean, with the same
message (`from` the shared one)."""

from __future__ import annotations


class HubError(Exception):
    """Root of every error the hub raises on purpose; the message says what to do."""


class UsageError(HubError):
    """Bad arguments or configuration; exit code 2."""


class HubAlreadyRunning(UsageError):
    """Another process runs this hub directory (or this replica); exit code 2."""


class NotInitialised(UsageError):
    def __init__(self, directory: str) -> None:
        super().__init__(
            f"{directory} is not a hub directory (no hub.toml): run "
            f"`edge-hub init --dir {directory} --region NAME` first"
        )


class BrokerError(HubError):
    """The managed broker could not be started, reloaded or reached."""

