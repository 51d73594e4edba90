"""Log lines for journald: logfmt, one event per line, never a key or a certificate.

    ts=2026-11-21T19:40:01.123Z level=info logger=edge_agent msg="dev-1 online (profile sim, backlog 0)"

A traceback is folded into its event's line (`exc="Traceback ...\\n..."`), so one event is
one line. When stderr is the journal (sd-daemon(3): `JOURNAL_STREAM` names stderr's device
and inode), each line starts with its syslog priority (`<3>` for an error), which journald
strips and keeps as the entry's PRIORITY. PEM blocks (private keys, certificates, CSRs) are
replaced by `[PRIVATE KEY redacted]` and the like before anything is formatted.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Final, TextIO

# From BEGIN to its END, or to the end of the text when a truncated message lost the END.
_PEM: Final = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,64})-----.*?(?:-----END [A-Z0-9 ]{1,64}-----|\Z)", re.S)
# What a value may not hold bare: control characters, quotes, backslashes, line separators.
_SPECIAL: Final = re.compile(r'[\x00-\x1f\x7f"\\\x85\u2028\u2029]')
_ESCAPES: Final = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, 0x85)},
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", ord('"'): '\\"', ord("\\"): "\\\\",
    0x2028: "\\u2028", 0x2029: "\\u2029",
}
# sd-daemon(3) prefixes: SD_CRIT, SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG.
_PRIORITIES: Final = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY: Final = 7


def redact(text: str) -> str:
    """`text` with every PEM block replaced by `[LABEL redacted]`."""
    if "-----BEGIN " not in text:
        return text
    return _PEM.sub(lambda m: f"[{m[1].strip()} redacted]", text)


def value(text: str) -> str:
    """One logfmt value: bare when it can be, else quoted with `"`, `\\` and controls escaped."""
    if _SPECIAL.search(text):
        return f'"{text.translate(_ESCAPES)}"'
    if not text or " " in text or "=" in text:
        return f'"{text}"'
    return text


def priority(levelno: int) -> int:
    """The syslog priority journald records for a Python log level."""
    return next((p for level, p in _PRIORITIES if levelno >= level), _DEBUG_PRIORITY)


class RedactPem(logging.Filter):
    """Replaces PEM blocks in a record's message, its arguments (formatted into one string) and
    its traceback; handlers that see the record after this one get the redacted text too."""

    _traceback = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  # a malformed call: the handler reports it, not the caller
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._traceback.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class LogfmtFormatter(logging.Formatter):
    """`ts level logger msg [exc] [stack]`, one line; `journal` adds the `<N>` priority prefix."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = (f"ts={ts} level={value(record.levelname.lower())} logger={value(record.name)} "
                f"msg={value(redact(record.getMessage()))}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += f" exc={value(redact(record.exc_text))}"
        if record.stack_info:
            line += f" stack={value(redact(self.formatStack(record.stack_info)))}"
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True when `stream` is the journal's stream socket (`JOURNAL_STREAM=DEV:INODE` matches it)."""
    dev, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's captured stream) or closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(inode))


def handler(stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) that writes redacted logfmt lines."""
    out = stream or sys.stderr
    result = logging.StreamHandler(out)
    result.setFormatter(LogfmtFormatter(journal=stream_is_journal(out)))
    result.addFilter(RedactPem())
    return result
