"""Repositories over config.db: settings, registered engines, the engine cache, proxy handles."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

from flm.core.timeutil import now_iso
from flm.storage.db import Database


@dataclass(frozen=True)
class Setting:
    key: str
    value: str
    updated_at: str
    notes: str | None


class SettingsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, key: str) -> Setting | None:
        row = self.db.query_one(
            "SELECT key, value, updated_at, notes FROM settings WHERE key=?", (key,)
        )
        return Setting(**dict(row)) if row else None

    def all(self) -> list[Setting]:
        rows = self.db.query("SELECT key, value, updated_at, notes FROM settings ORDER BY key")
        return [Setting(**dict(r)) for r in rows]

    def set(self, key: str, value: str) -> Setting:
        stamp = now_iso()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO settings(key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value, "
                "updated_at=excluded.updated_at",
                (key, value, stamp),
            )

        self.db.write(run)
        return Setting(key, value, stamp, None)


@dataclass(frozen=True)
class EngineRow:
    id: str
    kind: str
    base_url: str
    enabled: bool
    managed: bool
    pid: int | None
    model_path: str | None
    created_at: str
    api_key: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the engine's key."""
        data = asdict(self)
        data.pop("api_key")
        data["has_api_key"] = self.api_key is not None
        return data


class EnginesRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _row(row: sqlite3.Row) -> EngineRow:
        data: dict[str, Any] = dict(row)
        data["enabled"] = bool(data["enabled"])
        data["managed"] = bool(data["managed"])
        return EngineRow(**data)

    def all(self) -> list[EngineRow]:
        rows = self.db.query(
            "SELECT id, kind, base_url, enabled, managed, pid, model_path, created_at, api_key "
            "FROM engines ORDER BY id"
        )
        return [self._row(r) for r in rows]

    def get(self, engine_id: str) -> EngineRow | None:
        row = self.db.query_one(
            "SELECT id, kind, base_url, enabled, managed, pid, model_path, created_at, api_key "
            "FROM engines WHERE id=?",
            (engine_id,),
        )
        return self._row(row) if row else None

    def add(
        self,
        engine_id: str,
        kind: str,
        base_url: str,
        *,
        managed: bool = False,
        pid: int | None = None,
        model_path: str | None = None,
        api_key: str | None = None,
    ) -> EngineRow:
        stamp = now_iso()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO engines(id, kind, base_url, enabled, managed, pid, model_path, "
                "created_at, api_key) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?)",
                (engine_id, kind, base_url, int(managed), pid, model_path, stamp, api_key),
            )

        self.db.write(run)
        return EngineRow(engine_id, kind, base_url, True, managed, pid, model_path, stamp, api_key)

    def remove(self, engine_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM engines_cache WHERE engine_id=?", (engine_id,))
            return conn.execute("DELETE FROM engines WHERE id=?", (engine_id,)).rowcount

        return self.db.write(run) > 0


class EngineCacheRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> dict[str, tuple[str, float]]:
        rows = self.db.query("SELECT engine_id, state_json, cached_at FROM engines_cache")
        return {r["engine_id"]: (r["state_json"], float(r["cached_at"])) for r in rows}

    def replace(self, states: dict[str, str], cached_at: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM engines_cache")
            conn.executemany(
                "INSERT INTO engines_cache(engine_id, state_json, cached_at) VALUES (?, ?, ?)",
                [(k, v, cached_at) for k, v in states.items()],
            )

        self.db.write(run)


@dataclass(frozen=True)
class ProxyHandleRow:
    id: str
    pid: int
    port: int
    https_port: int | None
    bind: str
    mode: str
    config_json: str
    started_at: str


class ProxyHandlesRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> list[ProxyHandleRow]:
        rows = self.db.query(
            "SELECT id, pid, port, https_port, bind, mode, config_json, started_at "
            "FROM proxy_handles ORDER BY port"
        )
        return [ProxyHandleRow(**dict(r)) for r in rows]

    def add(self, handle: ProxyHandleRow) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO proxy_handles(id, pid, port, https_port, bind, mode, "
                "config_json, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    handle.id,
                    handle.pid,
                    handle.port,
                    handle.https_port,
                    handle.bind,
                    handle.mode,
                    handle.config_json,
                    handle.started_at,
                ),
            )

        self.db.write(run)

    def remove(self, handle_ids: list[str]) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute("DELETE FROM proxy_handles WHERE id=?", (h,)).rowcount
                for h in handle_ids
            )

        return self.db.write(run) if handle_ids else 0


@dataclass(frozen=True)
class PoolRow:
    """One engine pool: its name and members as ``(engine_id, weight)`` in the order given."""

    name: str
    members: tuple[tuple[str, float], ...]
    created_at: str

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_id": f"flm://pool:{self.name}/<model>",
            "members": [{"engine_id": e, "weight": w} for e, w in self.members],
            "created_at": self.created_at,
        }


class PoolsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> list[PoolRow]:
        pools = self.db.query("SELECT name, created_at FROM engine_pools ORDER BY name")
        members = self.db.query(
            "SELECT pool_name, engine_id, weight FROM engine_pool_members "
            "ORDER BY pool_name, position"
        )
        by_pool: dict[str, list[tuple[str, float]]] = {}
        for m in members:
            by_pool.setdefault(m["pool_name"], []).append((m["engine_id"], float(m["weight"])))
        return [
            PoolRow(p["name"], tuple(by_pool.get(p["name"], ())), p["created_at"]) for p in pools
        ]

    def add(self, name: str, members: list[tuple[str, float]]) -> PoolRow | None:
        """The new pool, or ``None`` when one with that name exists."""
        stamp = now_iso()

        def run(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM engine_pools WHERE name=?", (name,)).fetchone():
                return False
            conn.execute("INSERT INTO engine_pools(name, created_at) VALUES (?, ?)", (name, stamp))
            conn.executemany(
                "INSERT INTO engine_pool_members(pool_name, engine_id, weight, position) "
                "VALUES (?, ?, ?, ?)",
                [(name, e, w, i) for i, (e, w) in enumerate(members)],
            )
            return True

        return PoolRow(name, tuple(members), stamp) if self.db.write(run) else None

    def remove(self, name: str) -> bool:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM engine_pool_members WHERE pool_name=?", (name,))
            return conn.execute("DELETE FROM engine_pools WHERE name=?", (name,)).rowcount

        return self.db.write(run) > 0


class ModelAliasesRepo:
    """``model_aliases``: alias name → ``flm://`` id."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> list[dict[str, Any]]:
        rows = self._db.query("SELECT name, target, updated_at FROM model_aliases ORDER BY name")
        return [dict(r) for r in rows]

    def put(self, name: str, target: str, stamp: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO model_aliases(name, target, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET target=excluded.target, "
                "updated_at=excluded.updated_at",
                (name, target, stamp),
            )

        self._db.write(run)

    def remove(self, name: str) -> bool:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM model_aliases WHERE name=?", (name,)).rowcount

        return bool(self._db.write(run))
