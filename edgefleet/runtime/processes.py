"""Child processes in their own process group: stopped as a group, so that no grandchild is orphaned."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Final

log = logging.getLogger("edgefleet.processes")

# Between SIGTERM and SIGKILL: long enough for a clean exit, short next to a rule's cooldown.
KILL_GRACE_S: Final = 1.0


async def stop_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the group, give it KILL_GRACE_S, then SIGKILL whatever is left of it."""
    signal_group(process.pid, signal.SIGTERM)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_GRACE_S):
                await process.wait()
    finally:  # also when the caller is cancelled during the grace
        # The leader may be gone while a grandchild that ignores SIGTERM lives on in the group.
        signal_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(KILL_GRACE_S):  # a process stuck in the kernel cannot hold us
            await process.wait()


def signal_group(pgid: int, signum: signal.Signals) -> None:
    # start_new_session made the child a group leader, so its pid is the group id; Linux does
    # not reuse a pid while a group still carries it.
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # the whole group has already gone
    except PermissionError:
        log.warning("not permitted to send %s to process group %d", signum.name, pgid)
