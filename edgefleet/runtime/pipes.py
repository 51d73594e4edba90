"""Both command lines end here: a reader that leaves early (`edge-hub events | head`) is no error."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Final

EXIT_CLOSED_PIPE: Final = 128 + signal.SIGPIPE  # what the shell reports for a C tool SIGPIPE ended


def run_command(command: Callable[[], int]) -> int:
    """Run `command` and flush its output; when the reader of stdout has gone, stop quietly
    with EXIT_CLOSED_PIPE (Python ignores SIGPIPE, so the write raises instead of ending the
    process, and the traceback would be all the operator sees)."""
    try:
        try:
            code = command()
        except SystemExit:  # --help, a usage error: what they printed is flushed here too
            sys.stdout.flush()
            raise
        sys.stdout.flush()
    except BrokenPipeError:
        # What is still buffered cannot be written: the interpreter's last flush must not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_CLOSED_PIPE
    return code
