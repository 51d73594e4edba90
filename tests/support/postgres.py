"""A private PostgreSQL cluster for the tests: its own folder, a free loopback port, never the system's.

`initdb` and `pg_ctl` come from Debian's `postgresql` package (/usr/lib/postgresql/VERSION/bin). The
server refuses to run as root, so when the tests run as root the cluster belongs to the `postgres`
account and every command runs through `runuser -u postgres --`. fsync is off (a test cluster lives as
long as one pytest session and its machine does not crash); a kill -9 of the server loses nothing.
"""

from __future__ import annotations

import glob
import inspect
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import pytest

from tests.support.net import free_port

START_TIMEOUT_S: Final = 60.0  # initdb and the first start on 2 busy cores
STOP_TIMEOUT_S: Final = 30.0  # an immediate stop only signals the postmaster
COMMAND_TIMEOUT_S: Final = 60.0  # CREATE DATABASE copies the template on a loaded disk
TEMPLATE: Final = "edgefleet_template"  # each test's database is a copy of this empty one


def bin_dir() -> Path | None:
    """The newest installed server's bin folder, or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    """`start()` makes and starts the cluster; `stop()` ends it; `kill()`/`start_again()` for outages."""

    def __init__(self, root: Path, binaries: Path) -> None:
        self.root, self.bin = root, binaries
        self.data, self.sockets, self.log = root / "data", root / "sockets", root / "server.log"
        self.port = free_port()
        self.user = "postgres"
        self._as_postgres = os.geteuid() == 0  # the server refuses root

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def _run(self, *argv: str, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=True)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, account.pw_uid, account.pw_gid)
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                  "--encoding=UTF8", "--no-instructions", timeout=START_TIMEOUT_S)
        self.start_again()
        self.psql("postgres", f"CREATE DATABASE {TEMPLATE}")

    def start_again(self) -> None:
        """Start the server on its folder (again, after `kill`); returns once it accepts connections."""
        # fsync off: a killed server loses nothing the OS was handed. synchronous_commit must stay on:
        # off, a kill -9 loses commits already reported (and acknowledged to the devices).
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", str(int(START_TIMEOUT_S)), "start", timeout=START_TIMEOUT_S + 5)

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """`kill -9` of the postmaster, as a crash would; its backends end when they notice."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)  # no event to await for another process's end
        # Backends left behind hold the shared memory: wait until they have noticed and gone.
        while time.monotonic() < deadline and subprocess.run(
                ["pgrep", "-f", f"postgres.*{self.data}"], capture_output=True, check=False).returncode == 0:
            time.sleep(0.05)

    def stop(self) -> None:
        if self.pid() is None:
            return
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                  "-t", str(int(STOP_TIMEOUT_S)), "stop", timeout=STOP_TIMEOUT_S + 5)

    def psql(self, database: str, sql: str) -> str:
        return self._run(str(self.bin / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                         "-h", str(self.sockets), "-p", str(self.port), "-U", self.user, "-d", database,
                         "-c", sql).stdout

    def fresh_database(self) -> str:
        """A new, empty database (a copy of the template); its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql("postgres", f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.url(name)


def same_tests(module: ModuleType, fixture: str) -> dict[str, Callable[..., Any]]:
    """The tests of `module` that take the `fixture` argument and no other, to run again against a
    PostgreSQL-backed fixture of that name defined beside them."""
    found: dict[str, Callable[..., Any]] = {}
    for name, test in vars(module).items():
        if name.startswith("test_") and callable(test) and list(inspect.signature(test).parameters) == [fixture]:
            found[name] = test
    return found


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    binaries = bin_dir()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
                    "bash scripts/setup.sh test installs it")
    root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    root.chmod(0o755)
    cluster = PostgresCluster(root, binaries)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """The URL of a fresh database of the session's cluster, for one test."""
    if postgres_cluster.pid() is None:  # a test that killed the server and failed before restarting it
        postgres_cluster.start_again()
    return postgres_cluster.fresh_database()
