"""Backups of security.db with SQLite's online backup API (3 generations kept)."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from flm.core.errors import (
    DatabaseDamagedError,
    IoError,
    ProxyAlreadyRunningError,
    RepoError,
    UsageError,
)
from flm.core.paths import ensure_private_dir, make_dir, touch_private_file
from flm.core.timeutil import utc_now
from flm.services.runstate import pid_alive, running_daemon
from flm.storage import Storage
from flm.storage.config_db import ProxyHandlesRepo
from flm.storage.db import Database
from flm.storage.files import copy_database, inspect_backup, integrity_problems

GENERATIONS = 3
_BACKUP_NAME = re.compile(r"^security\.db\.bak\.(\d{8}T\d{6}\d{3}Z)$")


def _stamp() -> str:
    now = utc_now()
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


class BackupService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def create(self, output_dir: Path | None = None) -> dict[str, Any]:
        folder = (
            make_dir(output_dir)
            if output_dir is not None
            else ensure_private_dir(self._storage.paths.backups_dir)
        )
        db = self._storage.security  # opens + migrates, so the file exists
        # A backup of a damaged database is no backup, and writing one would prune a good
        # generation: check first (and the copy after), and keep every generation on failure.
        problems = integrity_problems(db.path)
        if problems:
            raise DatabaseDamagedError(
                f"{db.path} fails SQLite's integrity check ({'; '.join(problems[:3])}); no "
                "backup was written and no existing backup was removed. Restore a good one "
                "with `flm security backup restore --file FILE` (backups are in FLM's backups "
                "folder)",
                details={"problems": problems[:20]},
            )
        target = folder / f"security.db.bak.{_stamp()}"
        while target.exists():  # two backups in the same millisecond
            target = folder / f"security.db.bak.{_stamp()}"
        touch_private_file(target)
        try:
            copy_database(db.path, target)
        except sqlite3.Error as exc:
            target.unlink(missing_ok=True)
            raise RepoError(f"backup failed: {exc}") from exc
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise IoError(f"cannot write {target}: {exc}") from exc
        problems = integrity_problems(target, immutable=True)
        if problems:  # (the copy went wrong: a disk error)
            target.unlink(missing_ok=True)
            raise DatabaseDamagedError(
                f"the backup written to {target} failed its integrity check "
                f"({'; '.join(problems[:3])}); it was removed and no older backup was pruned",
                details={"problems": problems[:20]},
            )
        removed = self._prune(folder)
        return {
            "file": str(target),
            "size_bytes": target.stat().st_size,
            "pruned": [str(p) for p in removed],
            "generations": GENERATIONS,
        }

    @staticmethod
    def _keep_aside(target: Path) -> Path | None:
        """Keep the database a restore replaces beside it, as
        ``security.db.before-restore.<time>``: the audit trail written since the backup (never
        deleted silently, SPEC §5.4) and keys made since stay recoverable. Hard-linked, so the
        database path is never missing; its journal goes with it (it must not meet the new
        file)."""
        if not target.exists():
            return None
        previous = target.with_name(f"{target.name}.before-restore.{_stamp()}")
        try:
            os.link(target, previous)
        except OSError:  # a file system without hard links
            shutil.copy2(target, previous)
        wal = target.with_name(target.name + "-wal")
        if wal.exists():
            os.replace(wal, previous.with_name(previous.name + "-wal"))
        target.with_name(target.name + "-shm").unlink(missing_ok=True)
        return previous

    @staticmethod
    def _prune(folder: Path) -> list[Path]:
        backups = sorted(
            (p for p in folder.iterdir() if _BACKUP_NAME.match(p.name)), key=lambda p: p.name
        )
        old = backups[:-GENERATIONS] if len(backups) > GENERATIONS else []
        for path in old:
            path.unlink(missing_ok=True)
        return old

    def list(self, folder: Path | None = None) -> list[str]:
        folder = folder or self._storage.paths.backups_dir
        if not folder.is_dir():
            return []
        return sorted(str(p) for p in folder.iterdir() if _BACKUP_NAME.match(p.name))

    def restore(self, file: Path) -> dict[str, Any]:
        daemon = running_daemon(self._storage.paths)
        if daemon is not None:
            raise ProxyAlreadyRunningError(
                f"a proxy daemon is running (pid {daemon.pid}); stop it with "
                "`flm proxy stop --all` before restoring a backup"
            )
        running = [h for h in ProxyHandlesRepo(self._storage.config).all() if pid_alive(h.pid)]
        if running:  # a --no-daemon proxy has no daemon, only its handle
            raise ProxyAlreadyRunningError(
                f"a proxy is running ({running[0].id}, pid {running[0].pid}); stop it before "
                "restoring a backup"
            )
        if not file.is_file():
            raise UsageError(f"backup file {file} does not exist")
        # immutable: a backup is never written, so no lock, -wal or -shm file is needed (it
        # may sit in a read-only place, and reading leaves nothing beside it)
        try:
            ok, tables = inspect_backup(file)
        except sqlite3.Error as exc:
            raise UsageError(f"{file} is not a readable SQLite database: {exc}") from exc
        if not ok or "api_keys" not in tables:
            raise UsageError(f"{file} is not a healthy FLM security.db backup")
        self._storage.close()
        target = self._storage.paths.security_db
        # Copied into a new file, then renamed over the old one: the old file may be the
        # reason for the restore (a corrupt header is not a database SQLite can write into).
        fresh = target.with_name(f".{target.name}.restore.{os.getpid()}")
        fresh.unlink(missing_ok=True)
        touch_private_file(fresh)
        try:
            copy_database(file, fresh, immutable_source=True)
        except sqlite3.Error as exc:
            fresh.unlink(missing_ok=True)
            raise RepoError(f"restore failed: {exc}") from exc
        previous = self._keep_aside(target)
        os.replace(fresh, target)
        db = Database(target, "security").open()
        try:
            problems = db.integrity_problems()
            version = db.schema_version
            safe = db.safe_mode.message() if db.safe_mode else None
        finally:
            db.close()
        return {
            "restored_from": str(file),
            "security_db": str(target),
            "previous": str(previous) if previous is not None else None,
            "schema_version": version,
            "safe_mode": safe,
            "problems": problems,
        }
