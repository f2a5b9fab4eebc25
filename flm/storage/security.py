"""Repositories over security.db: API keys and the policy document."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flm.core.timeutil import now_iso
from flm.storage.db import Database


@dataclass(frozen=True)
class KeyLimits:
    """What a key may do: its models (``None``: all), request and token limits, expiry."""

    models: list[str] | None = None
    rpm: int | None = None
    burst: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    daily_requests: int | None = None
    expires_at: str | None = None
    read_only: bool = False


@dataclass(frozen=True)
class ApiKeyRow:
    id: str
    label: str
    created_at: str
    revoked_at: str | None
    limits: KeyLimits = field(default_factory=KeyLimits)
    last_used_at: str | None = None


_LIMIT_COLUMNS = ("rpm", "burst", "tpm", "daily_tokens", "daily_requests", "expires_at")
_KEY_COLUMNS = (
    "id, label, created_at, revoked_at, models_json, "
    + ", ".join(_LIMIT_COLUMNS)
    + ", read_only, last_used_at"
)


def _key_row(r: sqlite3.Row) -> ApiKeyRow:
    models = json.loads(r["models_json"]) if r["models_json"] is not None else None
    limits = KeyLimits(
        models,
        r["rpm"],
        r["burst"],
        r["tpm"],
        r["daily_tokens"],
        r["daily_requests"],
        r["expires_at"],
        bool(r["read_only"]),
    )
    return ApiKeyRow(
        r["id"], r["label"], r["created_at"], r["revoked_at"], limits, r["last_used_at"]
    )


def _limit_values(limits: KeyLimits) -> tuple[Any, ...]:
    models = None if limits.models is None else json.dumps(limits.models)
    return (models, *(getattr(limits, c) for c in _LIMIT_COLUMNS), int(limits.read_only))


class ApiKeysRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self, *, include_revoked: bool = True) -> list[ApiKeyRow]:
        sql = f"SELECT {_KEY_COLUMNS} FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        rows = self.db.query(sql + " ORDER BY created_at, id")
        return [_key_row(r) for r in rows]

    def get(self, key_id: str) -> ApiKeyRow | None:
        row = self.db.query_one(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id=?", (key_id,))
        return _key_row(row) if row else None

    def set_limits(self, key_id: str, limits: KeyLimits) -> bool:
        """Replace an active key's limits; False when there is no such active key."""

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE api_keys SET models_json=?, rpm=?, burst=?, tpm=?, daily_tokens=?, "
                "daily_requests=?, expires_at=?, read_only=? WHERE id=? AND revoked_at IS NULL",
                (*_limit_values(limits), key_id),
            ).rowcount

        return bool(self.db.write(run))

    def hash_of(self, key_id: str) -> str | None:
        """The stored Argon2id hash of an active key (for verification only)."""
        row = self.db.query_one(
            "SELECT hash FROM api_keys WHERE id=? AND revoked_at IS NULL", (key_id,)
        )
        return str(row["hash"]) if row else None

    def all_with_hashes(self) -> list[tuple[ApiKeyRow, str]]:
        """Every key with its Argon2id hash (to share through a state backend; never shown)."""
        rows = self.db.query(f"SELECT {_KEY_COLUMNS}, hash FROM api_keys ORDER BY created_at, id")
        return [(_key_row(r), str(r["hash"])) for r in rows]

    def import_key(self, row: ApiKeyRow, key_hash: str) -> None:
        """Store a key made by another FLM process (from the shared state backend): a new one
        as it is; a known one takes the label and limits; a revocation is never undone."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO api_keys(id, label, hash, created_at, revoked_at, models_json, rpm,"
                " burst, tpm, daily_tokens, daily_requests, expires_at, read_only)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET label=excluded.label,"
                " revoked_at=COALESCE(api_keys.revoked_at, excluded.revoked_at),"
                " models_json=excluded.models_json, rpm=excluded.rpm, burst=excluded.burst,"
                " tpm=excluded.tpm, daily_tokens=excluded.daily_tokens,"
                " daily_requests=excluded.daily_requests, expires_at=excluded.expires_at,"
                " read_only=excluded.read_only",
                (
                    row.id,
                    row.label,
                    key_hash,
                    row.created_at,
                    row.revoked_at,
                    *_limit_values(row.limits),
                ),
            )

        self.db.write(run)

    def count_active(self) -> int:
        row = self.db.query_one("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
        return int(row[0]) if row else 0

    def insert(
        self, key_id: str, label: str, key_hash: str, limits: KeyLimits | None = None
    ) -> ApiKeyRow:
        stamp = now_iso()
        limits = limits or KeyLimits()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO api_keys(id, label, hash, created_at, models_json, rpm, burst, tpm,"
                " daily_tokens, daily_requests, expires_at, read_only)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, label, key_hash, stamp, *_limit_values(limits)),
            )

        self.db.write(run)
        return ApiKeyRow(key_id, label, stamp, None, limits)

    def insert_many(self, keys: Sequence[tuple[str, str, str, KeyLimits]]) -> int:
        """Insert (id, label, hash, limits) rows in one transaction (imports, busy fixtures);
        returns how many were written."""
        stamp = now_iso()
        rows = [(i, label, h, stamp, *_limit_values(lim)) for i, label, h, lim in keys]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO api_keys(id, label, hash, created_at, models_json, rpm, burst, tpm,"
                " daily_tokens, daily_requests, expires_at, read_only)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

        self.db.write(run)
        return len(rows)

    def revoke(self, key_id: str) -> str | None:
        """Revoke an active key; the revocation time, or ``None`` if no such active key."""
        stamp = now_iso()

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE api_keys SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                (stamp, key_id),
            ).rowcount

        return stamp if self.db.write(run) else None

    def rotate(
        self, old_id: str, new_id: str, label: str, key_hash: str, limits: KeyLimits | None = None
    ) -> tuple[ApiKeyRow, str]:
        """Insert the new key (with the old one's limits) and revoke the old one in one
        transaction."""
        stamp = now_iso()
        limits = limits or KeyLimits()

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT INTO api_keys(id, label, hash, created_at, models_json, rpm, burst, tpm,"
                " daily_tokens, daily_requests, expires_at, read_only)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (new_id, label, key_hash, stamp, *_limit_values(limits)),
            )
            changed = conn.execute(
                "UPDATE api_keys SET revoked_at=?, replaced_by=? WHERE id=? AND revoked_at IS NULL",
                (stamp, new_id, old_id),
            ).rowcount
            if changed != 1:
                raise LookupError(old_id)
            return changed

        self.db.write(run)
        return ApiKeyRow(new_id, label, stamp, None, limits), stamp


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
