"""Log lines: logfmt, one event per line, journald priorities, and never a key or certificate."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from edgefleet.runtime import logfmt
from tests.integration.test_store_forward_faults import wait_until
from tests.support.harness import AGENT, HubDir, Proc, free_port

LINE = re.compile(r'^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(\w+) logger=(\S+) msg=(.*)$')
PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?: |$)')
UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def parse(line: str) -> dict[str, str]:
    """A logfmt line back into its fields: what a log shipper does with it."""
    fields: dict[str, str] = {}
    at = 0
    while at < len(line):
        m = PAIR.match(line, at)
        assert m is not None, f"not logfmt at {at}: {line[at:at + 40]!r}"
        raw = m[2]
        if raw.startswith('"'):
            raw = re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)", lambda e: _unescape(e[1]), raw[1:-1])
        fields[m[1]] = raw
        at = m.end()
    return fields


def _unescape(code: str) -> str:
    return chr(int(code[1:], 16)) if code[0] in "xu" and len(code) > 1 else UNESCAPE[code]


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing through the agent's handler into a string."""
    out = io.StringIO()
    logger = logging.getLogger("edge_agent.test_logs")
    handler = logfmt.handler(out)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def private_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


def test_a_line_has_time_level_logger_and_the_message(logged: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logged
    log.info("device %s online (profile %s, backlog %d)", "dev-1", "sim", 0)
    log.warning("ready")
    first, second = lines(out)
    assert LINE.match(first), first
    assert first.endswith(' level=info logger=edge_agent.test_logs msg="device dev-1 online (profile sim, backlog 0)"')
    assert second.endswith(" level=warning logger=edge_agent.test_logs msg=ready")  # bare when nothing needs quotes


@pytest.mark.parametrize("message", [
    'the rule says offline = "skip"',
    "C:\\path\\to\\file",
    "two\nlines\r\nand a\ttab",
    "",
    "a=b",
    "bell \x07 and nul \x00 and a line separator \u2028 and ünïcode",
])
def test_any_message_is_one_line_that_parses_back_to_itself(logged: tuple[logging.Logger, io.StringIO],
                                                            message: str) -> None:
    log, out = logged
    log.info("%s", message)
    [line] = lines(out)
    assert parse(line)["msg"] == message, line


def test_a_traceback_is_folded_into_its_events_line(logged: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logged
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("the agent stopped on an unexpected error")
    log.info("next event")
    first, second = lines(out)
    fields = parse(first)
    assert fields["level"] == "error"
    assert fields["msg"] == "the agent stopped on an unexpected error"
    assert fields["exc"].startswith("Traceback (most recent call last):\n")
    assert fields["exc"].endswith("ValueError: boom\nsecond line")
    assert parse(second)["msg"] == "next event"


def test_a_private_key_in_an_argument_is_never_written(logged: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logged
    pem = private_key_pem()
    body = "".join(pem.splitlines()[1:-1])
    log.error("cannot load the TLS identity from %s", pem)
    log.error("as bytes: %r", pem.encode())  # repr: the newlines are literal \n inside
    log.warning("in a dict: %s", {"key": pem, "next": 1})
    log.info(pem)  # the message itself
    log.error("truncated: %s", pem[:200])  # cut short: the END line is gone
    try:
        raise ValueError(f"not a key: {pem}")
    except ValueError:
        log.exception("in a traceback")
    text = out.getvalue()
    for chunk in [body[i:i + 16] for i in range(0, len(body) - 16, 16)]:
        assert chunk not in text
    assert "-----BEGIN" not in text
    assert text.count("[PRIVATE KEY redacted]") == 6, text
    assert parse(lines(out)[0])["msg"] == "cannot load the TLS identity from [PRIVATE KEY redacted]\n"


def test_text_around_a_certificate_survives_its_redaction() -> None:
    text = "before -----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE----- after"
    assert logfmt.redact(text) == "before [CERTIFICATE redacted] after"
    assert logfmt.redact("no armour here") == "no armour here"


def test_the_filter_redacts_for_every_handler_after_it() -> None:
    pem = private_key_pem()
    try:
        raise ValueError(pem)
    except ValueError as exc:
        record = logging.LogRecord("edge_agent", logging.ERROR, __file__, 1, "key %s", (pem,),
                                   (ValueError, exc, exc.__traceback__))
    assert logfmt.RedactPem().filter(record)
    plain = logging.Formatter().format(record)  # another handler's formatter, after ours
    assert "BEGIN" not in plain
    assert plain.startswith("key [PRIVATE KEY redacted]\n")
    assert plain.rstrip().endswith("ValueError: [PRIVATE KEY redacted]")


@pytest.mark.parametrize(("level", "priority"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2),
])
def test_priorities_follow_sd_daemon(level: int, priority: int) -> None:
    assert logfmt.priority(level) == priority


def test_the_journal_prefix_only_when_stderr_is_the_journal_stream(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream:
        st = os.fstat(stream.fileno())
        assert logfmt.stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logfmt.stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logfmt.stream_is_journal(stream, {})
        assert not logfmt.stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
    assert not logfmt.stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})  # no descriptor


async def test_the_agent_prefixes_priorities_when_its_stderr_is_the_journal(hub_dir: HubDir, bundles: Path,
                                                                           workdir: Path) -> None:
    """systemd sets JOURNAL_STREAM to stderr's device:inode; here stderr is a file we name the same way."""
    await hub_dir.provision(bundles, "dev-j")
    stderr = workdir / "stderr"
    with stderr.open("w") as sink:
        st = os.fstat(sink.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        argv = [AGENT, "run", "--config", str(bundles / "dev-j" / "agent.toml"), "--set", f"broker.port={free_port()}",
                "--set", "broker.connect_timeout=1"]
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=sink,
                                                    stderr=sink, env=env)
        try:
            # Nothing listens on that port: a warning per attempt.
            await wait_until(lambda: "retrying in" in stderr.read_text(), "a retry is logged")
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                assert await proc.wait() == 0
    written = stderr.read_text().splitlines()
    assert written
    for line in written:
        m = re.match(r"^<(\d)>(ts=.*)$", line)
        assert m is not None, line
        fields = parse(m[2])
        assert int(m[1]) == logfmt.priority(logging.getLevelName(fields["level"].upper())), line
    assert any(line.startswith("<4>") and "retrying in" in line for line in written), written


async def test_a_piped_agent_writes_plain_logfmt(hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-p")
    agent = await Proc("agent", [AGENT, "run", "--config", str(bundles / "dev-p" / "agent.toml"),
                                 "--set", f"broker.port={free_port()}"],
                       env={"JOURNAL_STREAM": "1:1"}).start()  # set, but not this pipe
    try:
        line = await agent.wait_for(r"retrying in")
    finally:
        assert await agent.stop() == 0
    assert LINE.match(line), line
    assert parse(line)["level"] == "warning"
