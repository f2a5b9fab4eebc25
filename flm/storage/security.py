"""Repositories over security.db: API keys and the policy document."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from flm.core.timeutil import now_iso
from flm.storage.db import Database


@dataclass(frozen=True)
class ApiKeyRow:
    id: str
    label: str
    created_at: str
    revoked_at: str | None


class ApiKeysRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self, *, include_revoked: bool = True) -> list[ApiKeyRow]:
        sql = "SELECT id, label, created_at, revoked_at FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        rows = self.db.query(sql + " ORDER BY created_at, id")
        return [ApiKeyRow(**dict(r)) for r in rows]

    def get(self, key_id: str) -> ApiKeyRow | None:
        row = self.db.query_one(
            "SELECT id, label, created_at, revoked_at FROM api_keys WHERE id=?", (key_id,)
        )
        return ApiKeyRow(**dict(row)) if row else None

    def hash_of(self, key_id: str) -> str | None:
        """The stored Argon2id hash of an active key (for verification only)."""
        row = self.db.query_one(
            "SELECT hash FROM api_keys WHERE id=? AND revoked_at IS NULL", (key_id,)
        )
        return str(row["hash"]) if row else None

    def count_active(self) -> int:
        row = self.db.query_one("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
        return int(row[0]) if row else 0

    def insert(self, key_id: str, label: str, key_hash: str) -> ApiKeyRow:
        stamp = now_iso()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO api_keys(id, label, hash, created_at) VALUES (?, ?, ?, ?)",
                (key_id, label, key_hash, stamp),
            )

        self.db.write(run)
        return ApiKeyRow(key_id, label, stamp, None)

    def revoke(self, key_id: str) -> str | None:
        """Revoke an active key; the revocation time, or ``None`` if no such active key."""
        stamp = now_iso()

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE api_keys SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                (stamp, key_id),
            ).rowcount

        return stamp if self.db.write(run) else None

    def rotate(self, old_id: str, new_id: str, label: str, key_hash: str) -> tuple[ApiKeyRow, str]:
        """Insert the new key and revoke the old one in one transaction."""
        stamp = now_iso()

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT INTO api_keys(id, label, hash, created_at) VALUES (?, ?, ?, ?)",
                (new_id, label, key_hash, stamp),
            )
            changed = conn.execute(
                "UPDATE api_keys SET revoked_at=?, replaced_by=? WHERE id=? AND revoked_at IS NULL",
                (stamp, new_id, old_id),
            ).rowcount
            if changed != 1:
                raise LookupError(old_id)
            return changed

        self.db.write(run)
        return ApiKeyRow(new_id, label, stamp, None), stamp


class PolicyRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self) -> tuple[str, str] | None:
        row = self.db.query_one(
            "SELECT policy_json, updated_at FROM security_policies WHERE id='default'"
        )
        return (str(row["policy_json"]), str(row["updated_at"])) if row else None

    def put(self, policy_json: str) -> str:
        stamp = now_iso()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO security_policies(id, policy_json, updated_at) "
                "VALUES ('default', ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "policy_json=excluded.policy_json, updated_at=excluded.updated_at",
                (policy_json, stamp),
            )

        self.db.write(run)
        return stamp
