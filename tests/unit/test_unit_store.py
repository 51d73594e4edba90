"""The hub's SQLite store on real files: schema, refusal of bad files, registry, presence."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from edgefleet.wire.protocol import Presence
from hub.db.store import SCHEMA_VERSION, HubStore, StoreError

PAGE = 4096


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HubStore]:
    s = await HubStore.open(tmp_path / "hub.db")
    try:
        yield s
    finally:
        await s.close()


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def online(session: str) -> Presence:
    return Presence(state="online", session=session, agent_version="0.1.0")


def offline(session: str) -> Presence:
    return Presence(state="offline", session=session)


async def make_full_db(path: Path, devices: int = 400) -> None:
    """A real hub database spanning many pages, closed cleanly (WAL folded back)."""
    s = await HubStore.open(path)
    try:
        for i in range(devices):
            await s.register(f"dev-{i:04d}", "sim", {"note": "x" * 200, "i": str(i)})
    finally:
        await s.close()
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


# --- opening -------------------------------------------------------------------------


async def test_open_creates_the_schema_private_to_the_hub(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    s = await HubStore.open(path)
    await s.close()
    assert user_version(path) == SCHEMA_VERSION
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_reopening_keeps_data_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    s = await HubStore.open(path)
    await s.register("dev-1", "sim", {"site": "lab"})
    await s.close()
    s = await HubStore.open(path)
    try:
        rows = await s.devices()
    finally:
        await s.close()
    assert [(r.device, r.tags) for r in rows] == [("dev-1", {"site": "lab"})]
    assert user_version(path) == SCHEMA_VERSION


async def test_an_empty_file_from_an_older_release_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    sqlite3.connect(path).close()  # schema 0: an empty database
    s = await HubStore.open(path)
    try:
        await s.register("dev-1", "sim", {})
        assert await s.exists("dev-1")
    finally:
        await s.close()
    assert user_version(path) == SCHEMA_VERSION


async def test_a_database_from_a_newer_hub_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE future (x)")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError) as info:
        await HubStore.open(path)
    message = str(info.value)
    assert "upgrade edge-hub" in message
    assert str(path) in message
    assert user_version(path) == SCHEMA_VERSION + 1


async def test_a_database_from_a_newer_hub_is_not_modified(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE future (x)")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = digest(path)
    with pytest.raises(StoreError):
        await HubStore.open(path)
    assert digest(path) == before


async def test_a_file_that_is_not_a_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    path.write_bytes(b"this is a text file, not the hub's database\n" * 200)
    before = digest(path)
    with pytest.raises(StoreError) as info:
        await HubStore.open(path)
    assert str(path) in str(info.value)
    assert path.exists()
    assert digest(path) == before


def corrupt(path: Path, first_page: int, last_page: int, fill: bytes | None = None) -> str:
    """Overwrite pages [first_page, last_page) (0-based) and return the file's digest."""
    data = bytearray(path.read_bytes())
    assert len(data) // PAGE > last_page + 2, "the test database is too small to corrupt its middle"
    start, stop = first_page * PAGE, last_page * PAGE
    data[start:stop] = fill * (stop - start) if fill else bytes((i * 151 + 17) % 256 for i in range(stop - start))
    path.write_bytes(bytes(data))
    return digest(path)


async def test_a_page_the_integrity_check_flags_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    await make_full_db(path)
    before = corrupt(path, 5, 6, fill=b"\x00")
    with pytest.raises(StoreError) as info:
        await HubStore.open(path)
    message = str(info.value)
    assert str(path) in message
    assert "integrity check" in message
    assert "backup" in message
    assert digest(path) == before


async def test_garbage_over_middle_pages_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    await make_full_db(path)
    before = corrupt(path, 10, 20)
    with pytest.raises(StoreError) as info:
        await HubStore.open(path)
    message = str(info.value)
    assert str(path) in message
    assert "backup" in message
    assert path.exists()
    assert digest(path) == before


async def test_opening_does_not_leave_a_refused_file_locked(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    db.close()
    for _ in range(3):
        with pytest.raises(StoreError):
            await HubStore.open(path)
    with sqlite3.connect(path, timeout=0.1) as db:
        db.execute("PRAGMA user_version = 0")
    db.close()
    s = await HubStore.open(path)
    await s.close()


# --- registry and certificates -------------------------------------------------------


async def test_registering_again_updates_profile_and_tags(store: HubStore) -> None:
    await store.register("dev-1", "sim", {"site": "lab"})
    await store.register("dev-1", "rpi-4", {"site": "field", "rack": "7"})
    [row] = await store.devices()
    assert row.profile == "rpi-4"
    assert row.tags == {"site": "field", "rack": "7"}


async def test_a_new_device_row_has_the_documented_fields(store: HubStore) -> None:
    await store.register("dev-1", "sim", {"site": "lab"})
    [row] = await store.devices()
    line = json.loads(msgspec.json.encode(row))
    for key in ("device", "profile", "tags", "online", "last_seen", "policy_version",
                "backlog", "dropped", "cert_expires"):
        assert key in line
    assert line["device"] == "dev-1"
    assert line["online"] is False
    assert line["last_seen"] is None
    assert line["cert_expires"] is None


async def test_devices_are_listed_in_order_and_can_be_filtered(store: HubStore) -> None:
    for name in ("dev-c", "dev-a", "dev-b"):
        await store.register(name, "sim", {})
    assert [r.device for r in await store.devices()] == ["dev-a", "dev-b", "dev-c"]
    assert [r.device for r in await store.devices("dev-b")] == ["dev-b"]
    assert await store.devices("dev-z") == []


async def test_cert_expires_shows_the_latest_valid_device_certificate(store: HubStore) -> None:
    await store.register("dev-1", "sim", {})
    early = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)
    late = dt.datetime(2032, 6, 1, 12, 0, tzinfo=dt.UTC)
    await store.record_certificate(0xA1, "dev-1", "device", early)
    await store.record_certificate(0xA2, "dev-1", "device", late)
    await store.record_certificate(0xA3, "dev-1", "probe", dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
    [row] = await store.devices()
    assert row.cert_expires is not None
    assert dt.datetime.fromisoformat(row.cert_expires) == late


async def test_revoking_a_device_revokes_its_device_certificates(store: HubStore) -> None:
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    await store.register("dev-1", "sim", {})
    await store.register("dev-2", "sim", {})
    serial_a, serial_b, other, probe = 2**150 + 1, 2**150 + 2, 0xBEEF, 0xF00D
    await store.record_certificate(serial_a, "dev-1", "device", future)
    await store.record_certificate(serial_b, "dev-1", "device", future)
    await store.record_certificate(probe, "dev-1", "probe", future)
    await store.record_certificate(other, "dev-2", "device", future)

    assert await store.revoke_device("dev-1") == 2

    assert await store.is_revoked("dev-1")
    assert not await store.is_revoked("dev-2")
    assert await store.certificate_revoked(serial_a)
    assert await store.certificate_revoked(serial_b)
    assert not await store.certificate_revoked(other)
    assert {serial for serial, _ in await store.revoked_serials()} == {serial_a, serial_b}
    rows = {r.device: r for r in await store.devices()}
    assert rows["dev-1"].revoked
    assert rows["dev-1"].cert_expires is None
    assert not rows["dev-2"].revoked


async def test_revoking_twice_keeps_the_first_revocation_time(store: HubStore) -> None:
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    await store.register("dev-1", "sim", {})
    await store.record_certificate(7, "dev-1", "device", future)
    await store.revoke_device("dev-1")
    [(_, first)] = await store.revoked_serials()
    assert await store.revoke_device("dev-1") == 0
    [(_, second)] = await store.revoked_serials()
    assert first == second


async def test_expired_certificates_are_left_out_of_the_crl(store: HubStore) -> None:
    now = dt.datetime.now(dt.UTC)
    await store.register("dev-1", "sim", {})
    await store.record_certificate(1, "dev-1", "device", now - dt.timedelta(days=1))
    await store.record_certificate(2, "dev-1", "device", now + dt.timedelta(days=1))
    await store.revoke_device("dev-1")
    revoked = await store.revoked_serials()
    assert [serial for serial, _ in revoked] == [2]
    assert await store.certificate_revoked(1)  # still known as revoked, just not listed
    when = revoked[0][1]
    assert when.tzinfo is not None
    assert abs(when.timestamp() - time.time()) < 60


async def test_a_single_serial_can_be_revoked(store: HubStore) -> None:
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    await store.register("dev-1", "sim", {})
    await store.record_certificate(0x10, "dev-1", "kick", future)
    await store.revoke_serial(0x10)
    assert await store.certificate_revoked(0x10)
    assert [s for s, _ in await store.revoked_serials()] == [0x10]
    assert not await store.is_revoked("dev-1")


async def test_readmitting_a_revoked_device_clears_the_revocation(store: HubStore) -> None:
    await store.register("dev-1", "sim", {})
    await store.revoke_device("dev-1")
    await store.register("dev-1", "sim", {})
    assert await store.is_revoked("dev-1")
    await store.register("dev-1", "sim", {}, readmit=True)
    assert not await store.is_revoked("dev-1")


async def test_an_unknown_certificate_is_not_revoked(store: HubStore) -> None:
    assert not await store.certificate_revoked(12345)
    assert not await store.is_revoked("nobody")
    assert not await store.exists("nobody")


# --- presence ------------------------------------------------------------------------


async def test_online_presence_marks_the_device_online(store: HubStore) -> None:
    await store.register("dev-1", "sim", {})
    assert await store.apply_presence("dev-1", online("s1"), 1_700_000_000.0)
    [row] = await store.devices()
    assert row.online is True
    assert row.last_seen == "2023-11-14T22:13:20+00:00"
    assert row.agent_version == "0.1.0"


async def test_a_matching_offline_marks_the_device_offline(store: HubStore) -> None:
    await store.register("dev-1", "sim", {})
    await store.apply_presence("dev-1", online("s1"), 100.0)
    assert await store.apply_presence("dev-1", offline("s1"), 200.0)
    [row] = await store.devices()
    assert row.online is False
    assert row.last_seen == "1970-01-01T00:03:20+00:00"


async def test_a_stale_last_will_does_not_mark_a_reconnected_device_offline(store: HubStore) -> None:
    # The old connection's Last Will arrives after the new connection said it is online.
    await store.register("dev-1", "sim", {})
    await store.apply_presence("dev-1", online("old"), 100.0)
    await store.apply_presence("dev-1", online("new"), 110.0)
    assert not await store.apply_presence("dev-1", offline("old"), 120.0)
    [row] = await store.devices()
    assert row.online is True
    assert row.last_seen == "1970-01-01T00:01:50+00:00"
    # The current connection's own offline still counts.
    assert await store.apply_presence("dev-1", offline("new"), 130.0)
    [row] = await store.devices()
    assert row.online is False


async def test_presence_for_an_unknown_device_is_ignored(store: HubStore) -> None:
    assert not await store.apply_presence("ghost", online("s1"), 100.0)
    assert await store.devices() == []
    assert not await store.exists("ghost")


async def test_a_revoked_device_never_shows_online(store: HubStore) -> None:
    await store.register("dev-1", "sim", {})
    await store.apply_presence("dev-1", online("s1"), 100.0)
    await store.revoke_device("dev-1")
    [row] = await store.devices()
    assert row.online is False
    assert row.revoked is True


async def test_presence_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    s = await HubStore.open(path)
    await s.register("dev-1", "sim", {"site": "lab"})
    await s.apply_presence("dev-1", online("s1"), 100.0)
    await s.close()
    s = await HubStore.open(path)
    try:
        # After a hub restart the stale-Will rule still knows the current session.
        assert not await s.apply_presence("dev-1", offline("s0"), 150.0)
        [row] = await s.devices()
    finally:
        await s.close()
    assert row.online is True
    assert row.tags == {"site": "lab"}
