"""Repositories over config.db's model profiles and API prompts."""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any

from flm.storage.db import Database
from flm.storage.records import and_equal


class ModelProfilesRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(
        self, engine_id: str | None = None, model_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Rows (``parameters_json`` as stored), oldest update first within a model."""
        params: list[Any] = []
        sql = and_equal(
            "SELECT id, engine_id, model_id, label, parameters_json, version, "
            "updated_at FROM model_profiles WHERE 1=1",
            params,
            engine_id=engine_id,
            model_id=model_id,
        )
        rows = self.db.query(sql + " ORDER BY engine_id, model_id, updated_at", params)
        return [dict(r) for r in rows]

    def save(
        self, engine_id: str, model_id: str, label: str, parameters_json: str, stamp: str
    ) -> tuple[str, int]:
        """Insert the profile, or update the one with the same engine, model and label;
        its id and version."""

        def run(conn: sqlite3.Connection) -> tuple[str, int]:
            row = conn.execute(
                "SELECT id, version FROM model_profiles WHERE engine_id=? AND "
                "model_id=? AND label=?",
                (engine_id, model_id, label),
            ).fetchone()
            if row is None:
                new_id = secrets.token_hex(6)
                conn.execute(
                    "INSERT INTO model_profiles(id, engine_id, model_id, label, "
                    "parameters_json, version, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?)",
                    (new_id, engine_id, model_id, label, parameters_json, stamp),
                )
                return new_id, 1
            conn.execute(
                "UPDATE model_profiles SET parameters_json=?, version=version+1, "
                "updated_at=? WHERE id=?",
                (parameters_json, stamp, row[0]),
            )
            return str(row[0]), int(row[1]) + 1

        result: tuple[str, int] = self.db.write(run)
        return result

    def delete(self, profile_id: str) -> int:
        return self.db.execute("DELETE FROM model_profiles WHERE id=?", (profile_id,))


class ApiPromptsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT api_id, template_text, version, updated_at FROM api_prompts ORDER BY api_id"
        )
        return [dict(r) for r in rows]

    def get(self, api_id: str) -> dict[str, Any] | None:
        row = self.db.query_one(
            "SELECT api_id, template_text, version, updated_at FROM api_prompts WHERE api_id=?",
            (api_id,),
        )
        return None if row is None else dict(row)

    def put(self, api_id: str, template: str, stamp: str) -> int:
        """Set the prompt (a new version if there was one); its version."""

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT INTO api_prompts(api_id, template_text, version, updated_at) "
                "VALUES (?, ?, 1, ?) ON CONFLICT(api_id) DO UPDATE SET "
                "template_text=excluded.template_text, version=api_prompts.version+1, "
                "updated_at=excluded.updated_at",
                (api_id, template, stamp),
            )
            row = conn.execute(
                "SELECT version FROM api_prompts WHERE api_id=?", (api_id,)
            ).fetchone()
            return int(row[0])

        version: int = self.db.write(run)
        return version

    def delete(self, api_id: str) -> int:
        return self.db.execute("DELETE FROM api_prompts WHERE api_id=?", (api_id,))
