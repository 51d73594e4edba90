"""The hub's enrollments (bootstrap credentials for one image folder) and the devices they
enrolled. SQL only; the decisions are hub.pki.enroll's. Its schema is one step of
hub.db.store.MIGRATIONS."""

from __future__ import annotations

import json
from typing import Final

import msgspec

from hub.db.interface import Tx

SCHEMA: Final = """
    CREATE TABLE enrollments (
        id TEXT PRIMARY KEY,              -- the public part of the bootstrap credential
        secret_sha256 TEXT NOT NULL,      -- hex, the secret itself is only in the image folder
        profile TEXT NOT NULL,
        tags TEXT NOT NULL,               -- JSON object
        max_devices INTEGER,              -- NULL: no limit
        expires_at REAL,                  -- NULL: never
        approve INTEGER NOT NULL,         -- 1: every request waits for edge-hub approvals approve
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE enrolled (
        device TEXT PRIMARY KEY,
        enrollment TEXT NOT NULL,
        key_id TEXT NOT NULL,             -- protocol.key_id of the key it enrolled with
        serial TEXT NOT NULL,             -- hex, the certificate issued
        enrolled_at REAL NOT NULL
    );
    CREATE INDEX enrolled_enrollment ON enrolled(enrollment);
    CREATE TABLE enroll_readmit (         -- edge-hub enroll readmit: the next enrollment of it may use a new key
        device TEXT PRIMARY KEY,
        readmitted_by TEXT NOT NULL, at REAL NOT NULL
    );
    CREATE TABLE enroll_counts (          -- requests by outcome or refusal reason (the metrics endpoint)
        outcome TEXT PRIMARY KEY, count INTEGER NOT NULL
    )
"""


class EnrollmentRow(msgspec.Struct, frozen=True):
    """One line of `edge-hub enroll list --json`."""

    id: str
    profile: str
    tags: dict[str, str]
    max_devices: int | None
    expires_at: float | None
    approve: bool
    created_at: float
    created_by: str
    revoked_at: float | None
    enrolled: int
    pending: int


async def insert_enrollment(db: Tx, row: EnrollmentRow, secret_sha256: str) -> None:
    await db.execute(
        "INSERT INTO enrollments(id, secret_sha256, profile, tags, max_devices, expires_at, approve, created_at, "
        "created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (row.id, secret_sha256, row.profile, json.dumps(row.tags, sort_keys=True), row.max_devices,
         row.expires_at, int(row.approve), row.created_at, row.created_by))


async def enrollment(db: Tx, enrollment_id: str) -> tuple[EnrollmentRow, str] | None:
    """The enrollment and its secret's hash, or None."""
    found = await list_enrollments(db, enrollment_id)
    if not found:
        return None
    digest = await db.fetch_one("SELECT secret_sha256 FROM enrollments WHERE id = ?", (enrollment_id,))
    return found[0], digest[0]


async def list_enrollments(db: Tx, enrollment_id: str | None = None) -> list[EnrollmentRow]:
    rows = await db.fetch(
        "SELECT e.id, e.profile, e.tags, e.max_devices, e.expires_at, e.approve, e.created_at, e.created_by, "
        "e.revoked_at, (SELECT COUNT(*) FROM enrolled n WHERE n.enrollment = e.id), "
        "(SELECT COUNT(*) FROM approvals a WHERE a.state = 'pending' AND a.rule = 'enrollment ' || e.id) "
        "FROM enrollments e WHERE e.id = ? OR ? ORDER BY e.created_at", (enrollment_id, enrollment_id is None))
    return [EnrollmentRow(r[0], r[1], json.loads(r[2]), r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9], r[10])
            for r in rows]


async def revoke_enrollment(db: Tx, enrollment_id: str, now: float) -> bool:
    """End new enrollments with this credential; False when it was revoked already."""
    return await db.execute("UPDATE enrollments SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                            (now, enrollment_id)) > 0


async def record_enrolled(db: Tx, device: str, enrollment_id: str, key_id: str, serial: str,
                          now: float) -> None:
    await db.execute(
        "INSERT INTO enrolled(device, enrollment, key_id, serial, enrolled_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(device) DO UPDATE SET enrollment = excluded.enrollment, key_id = excluded.key_id, "
        "serial = excluded.serial, enrolled_at = excluded.enrolled_at",
        (device, enrollment_id, key_id, serial, now))


async def enrolled_count(db: Tx, enrollment_id: str) -> int:
    return int((await db.fetch_one("SELECT COUNT(*) FROM enrolled WHERE enrollment = ?", (enrollment_id,)))[0])


async def readmit(db: Tx, device: str, by: str, now: float) -> None:
    await db.execute("INSERT INTO enroll_readmit(device, readmitted_by, at) VALUES (?, ?, ?) ON CONFLICT(device) "
                     "DO UPDATE SET readmitted_by = excluded.readmitted_by, at = excluded.at", (device, by, now))


async def take_readmit(db: Tx, device: str) -> str | None:
    """Use up the operator's readmission of `device`: who gave it, or None when there is none."""
    row = await db.fetch_one("SELECT readmitted_by FROM enroll_readmit WHERE device = ?", (device,))
    if row is None:
        return None
    await db.execute("DELETE FROM enroll_readmit WHERE device = ?", (device,))
    return str(row[0])


async def add_counts(db: Tx, counts: dict[str, int]) -> None:
    await db.executemany(
        "INSERT INTO enroll_counts(outcome, count) VALUES (?, ?) "
        "ON CONFLICT(outcome) DO UPDATE SET count = enroll_counts.count + excluded.count", list(counts.items()))
