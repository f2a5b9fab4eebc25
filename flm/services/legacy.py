"""Migration from the earlier prototype (SPEC §8.1): ``flm migrate legacy plan|convert|apply``.

The prototype kept ``config.json`` and one SQLite file (``flm.db``, ``database.db`` or
``data.db``) with tables ``apis``, ``api_keys`` and ``user_settings``. Reading is lenient about
the data (NULLs, duplicate names, bytes that are not UTF-8, a missing table: each becomes a
warning in the plan) and strict about the files (a missing or unreadable ``config.json`` or
database is an error before anything is written).

- ``plan`` writes ``migration-plan.json`` (what would change, counts, warnings) to the tmp dir;
- ``convert`` writes the converted ``settings.json`` and ``proxy_profiles.json`` there too;
- ``apply --confirm`` backs up both databases (``backups/<db>.bak.<ts>``), writes settings and
  proxy profiles in one transaction, runs ``flm check``, and puts both databases back byte for
  byte from the backups if the check fails. Any failure before the commit rolls the transaction
  back, which leaves the files untouched.

Settings FLM knows are mapped (``port`` → ``proxy.port`` …); everything else from
``config.json`` and ``user_settings`` is kept in the ``notes`` of the ``legacy.import``
setting. Encrypted legacy keys cannot be migrated: they are counted and the report says to
create new keys. Every run that gets past reading writes a log to ``logs/migrations/<ts>.log``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flm.core.errors import FlmError, UsageError
from flm.core.paths import Paths

DB_NAMES = ("flm.db", "database.db", "data.db")
TABLES = ("apis", "api_keys", "user_settings")

#: Legacy setting names (config.json keys and user_settings keys) → FLM settings.
SETTING_MAP = {
    "port": "proxy.port",
    "proxy_port": "proxy.port",
    "default_port": "proxy.port",
    "bind": "proxy.bind",
    "host": "proxy.bind",
    "bind_address": "proxy.bind",
    "language": "preferred_language",
    "lang": "preferred_language",
    "locale": "preferred_language",
    "preferred_language": "preferred_language",
    "log_level": "log.level",
    "audit_retention_days": "audit.retention_days",
}
NOTES_KEY = "legacy.import"


class LegacySourceError(FlmError):
    code = "LEGACY_SOURCE_INVALID"


class MigrationFailedError(FlmError):
    code = "MIGRATION_FAILED"


@dataclass
class Conversion:
    source: str
    db_file: str
    settings: list[dict[str, Any]] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    keys_not_migrated: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    def plan(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "database": self.db_file,
            "counts": {
                **self.counts,
                "settings_to_write": len(self.settings),
                "proxy_profiles_to_write": len(self.profiles),
                "unknown_fields_kept_in_notes": sum(
                    len(v) for v in self.notes.values() if isinstance(v, dict)
                ),
                "api_keys_not_migrated": self.keys_not_migrated,
            },
            "settings": [{k: s[k] for k in ("key", "value", "from")} for s in self.settings],
            "proxy_profiles": [
                {
                    "id": p["id"],
                    "port": p["config"]["port"],
                    "from_api": p["config"]["legacy"]["id"],
                }
                for p in self.profiles
            ],
            "conflicts": self.conflicts,
            "warnings": self.warnings,
            "api_keys": (
                f"{self.keys_not_migrated} legacy API key(s) are stored encrypted and cannot be "
                "migrated: create new keys with `flm api-keys create --label NAME` and give "
                "them to your clients"
                if self.keys_not_migrated
                else "no legacy API keys"
            ),
        }


# --- reading the legacy files ----------------------------------------------------------------


def _text(value: Any, where: str, warnings: list[str]) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            warnings.append(f"{where}: not UTF-8 text; undecodable bytes replaced with U+FFFD")
            return value.decode("utf-8", errors="replace")
    return str(value)


def find_database(source: Path) -> Path:
    for name in DB_NAMES:
        if (source / name).is_file():
            return source / name
    raise LegacySourceError(f"no legacy database in {source} (looked for {', '.join(DB_NAMES)})")


def read_config_json(source: Path) -> dict[str, Any]:
    path = source / "config.json"
    if not path.is_file():
        raise LegacySourceError(f"no legacy config.json in {source}")
    try:
        raw = path.read_bytes()
        document = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LegacySourceError(f"{path} is not a readable JSON document: {exc}") from None
    if not isinstance(document, dict):
        raise LegacySourceError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document


def read_tables(db_path: Path) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Rows of the legacy tables (absent tables: empty, with a warning), read-only."""
    from flm.storage.legacy import LegacyReadError, read_legacy_tables

    try:
        tables, missing = read_legacy_tables(db_path)
    except LegacyReadError as exc:
        raise LegacySourceError(str(exc)) from None
    warnings = [
        f"table {t} is missing from {db_path.name}; nothing to migrate from it" for t in missing
    ]
    return tables, warnings


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:48] or "api"


def _existing(paths: Paths) -> tuple[dict[str, str], set[str]]:
    """Settings and proxy profile ids already in config.db (read-only; none if absent)."""
    from flm.storage.legacy import existing_settings_and_profiles

    return existing_settings_and_profiles(paths.config_db)


def _map_setting(
    key: str,
    value: Any,
    origin: str,
    conv: Conversion,
    taken: dict[str, str],
    unknown: dict[str, Any],
) -> None:
    from flm.services.settings import KNOWN

    target = SETTING_MAP.get(key.strip().lower())
    if target is None or value is None:
        unknown[key] = value
        return
    try:
        parsed = KNOWN[target].parse(str(value).strip())
    except FlmError as exc:
        conv.warnings.append(
            f"{origin} {key}={value!r} is not a valid {target} ({exc.message}); kept in notes"
        )
        unknown[key] = value
        return
    text = str(parsed)
    if any(s["key"] == target for s in conv.settings):
        conv.warnings.append(
            f"{origin} {key} maps to {target}, already set from another field; kept in notes"
        )
        unknown[key] = value
        return
    if target in taken and taken[target] != text:
        conv.conflicts.append(
            f"{target}: FLM already has {taken[target]!r}; the legacy value "
            f"{text!r} ({origin} {key}) is kept in notes, not applied"
        )
        unknown[key] = value
        return
    if target not in taken:
        conv.settings.append({"key": target, "value": text, "from": f"{origin}:{key}"})


def convert_source(source: Path, paths: Paths) -> Conversion:
    """Read and convert a legacy directory (nothing is written)."""
    if not source.is_dir():
        raise LegacySourceError(f"legacy source directory {source} does not exist")
    config = read_config_json(source)
    db_path = find_database(source)
    tables, warnings = read_tables(db_path)
    conv = Conversion(str(source), db_path.name, warnings=warnings)
    settings, profile_ids = _existing(paths)

    config_unknown: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict | list):
            config_unknown[key] = value
            continue
        _map_setting(key, value, "config.json", conv, settings, config_unknown)

    user_unknown: dict[str, Any] = {}
    for row in tables["user_settings"]:
        name = _text(row.get("key"), "user_settings.key", conv.warnings)
        if not name:
            conv.warnings.append("user_settings row without a key skipped")
            continue
        text = _text(row.get("value"), f"user_settings[{name}].value", conv.warnings)
        _map_setting(name, text, "user_settings", conv, settings, user_unknown)

    used = set(profile_ids)
    for row in tables["apis"]:
        legacy_id = _text(row.get("id"), "apis.id", conv.warnings)
        name = _text(row.get("name"), f"apis[{legacy_id}].name", conv.warnings)
        if not name:
            conv.warnings.append(f"apis[{legacy_id}] has no name; named api-{legacy_id}")
            name = f"api-{legacy_id}"
        port = row.get("port")
        try:
            port_number = int(port) if port is not None else None
        except (TypeError, ValueError):
            port_number = None
        if port_number is None or not 1 <= port_number <= 65535:
            conv.warnings.append(
                f"apis[{legacy_id}] ({name}) has no valid port ({port!r}); the profile uses 8080"
            )
            port_number = 8080
        base = f"legacy-{_slug(name)}"
        profile_id, n = base, 1
        while profile_id in used:
            n += 1
            profile_id = f"{base}-{n}"
        if profile_id != base:
            conv.warnings.append(
                f"apis name {name!r} is used more than once; this one "
                f"(id {legacy_id}) becomes {profile_id}"
            )
        used.add(profile_id)
        conv.profiles.append(
            {
                "id": profile_id,
                "config": {
                    "name": name,
                    "mode": "local-http",
                    "port": port_number,
                    "bind": "127.0.0.1",
                    "model": _text(row.get("model"), f"apis[{legacy_id}].model", conv.warnings),
                    "legacy": {
                        "id": legacy_id,
                        "enable_auth": None
                        if row.get("enable_auth") is None
                        else bool(row.get("enable_auth")),
                        "status": _text(
                            row.get("status"), f"apis[{legacy_id}].status", conv.warnings
                        ),
                        "created_at": _text(
                            row.get("created_at"), "apis.created_at", conv.warnings
                        ),
                        "updated_at": _text(
                            row.get("updated_at"), "apis.updated_at", conv.warnings
                        ),
                    },
                },
            }
        )

    conv.keys_not_migrated = len(tables["api_keys"])
    conv.notes = {
        "source": str(source),
        "database": db_path.name,
        "config_json": config_unknown,
        "user_settings": user_unknown,
    }
    conv.counts = {
        "apis": len(tables["apis"]),
        "api_keys": len(tables["api_keys"]),
        "user_settings": len(tables["user_settings"]),
        "config_json_fields": len(config),
    }
    return conv


# --- writing -------------------------------------------------------------------------------


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


class MigrationLog:
    def __init__(self, paths: Paths, stamp: str) -> None:
        self.path = paths.logs_dir / "migrations" / f"{stamp}.log"
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {message}")
        _write_private(self.path, "\n".join(self.lines) + "\n")


def plan(source: Path, tmp: Path, paths: Paths) -> dict[str, Any]:
    conv = convert_source(source, paths)
    log = MigrationLog(paths, _stamp())
    document = conv.plan()
    _write_private(tmp / "migration-plan.json", json.dumps(document, indent=2, ensure_ascii=False))
    log(f"plan: {source} -> {tmp / 'migration-plan.json'}: {json.dumps(document['counts'])}")
    return {**document, "plan_file": str(tmp / "migration-plan.json"), "log": str(log.path)}


def convert(source: Path, tmp: Path, paths: Paths) -> dict[str, Any]:
    conv = convert_source(source, paths)
    log = MigrationLog(paths, _stamp())
    document = conv.plan()
    files = {
        "plan_file": tmp / "migration-plan.json",
        "settings_file": tmp / "settings.json",
        "proxy_profiles_file": tmp / "proxy_profiles.json",
    }
    _write_private(files["plan_file"], json.dumps(document, indent=2, ensure_ascii=False))
    _write_private(
        files["settings_file"],
        json.dumps(
            {"settings": conv.settings, "notes": {NOTES_KEY: conv.notes}},
            indent=2,
            ensure_ascii=False,
        ),
    )
    _write_private(
        files["proxy_profiles_file"], json.dumps(conv.profiles, indent=2, ensure_ascii=False)
    )
    log(f"convert: {source} -> {tmp}")
    return {**document, **{k: str(v) for k, v in files.items()}, "log": str(log.path)}


def _checkpoint(db: Path) -> None:
    from flm.storage.legacy import checkpoint

    checkpoint(db)


def _restore(db: Path, backup: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(backup, db)


def write_rows(conn: sqlite3.Connection, conv: Conversion, stamp: str) -> None:
    """The whole change, inside the caller's transaction."""
    from flm.storage.legacy import insert_setting, upsert_setting_notes

    for item in conv.settings:
        insert_setting(conn, item["key"], item["value"], stamp)
    upsert_setting_notes(conn, NOTES_KEY, stamp, stamp, json.dumps(conv.notes, ensure_ascii=False))
    for profile in conv.profiles:
        insert_profile(conn, profile, stamp)


def insert_profile(conn: sqlite3.Connection, profile: dict[str, Any], stamp: str) -> None:
    from flm.storage.legacy import insert_proxy_profile

    insert_proxy_profile(conn, profile["id"], profile["config"], stamp)


def apply(source: Path, paths: Paths, *, confirm: bool, storage_factory: Any) -> dict[str, Any]:
    """Apply a conversion (``storage_factory(paths)`` opens FLM's databases, for the check)."""
    conv = convert_source(source, paths)
    if not confirm:
        raise UsageError(
            "`apply` changes config.db: review `flm migrate legacy plan` first, "
            "then run `flm migrate legacy apply --confirm`; nothing was changed"
        )
    from flm.core.timeutil import now_iso
    from flm.services.check import run_check
    from flm.services.runstate import running_daemon

    if running_daemon(paths) is not None:
        from flm.core.errors import ProxyAlreadyRunningError

        raise ProxyAlreadyRunningError(
            "stop running proxies (`flm proxy stop --all`) before applying a migration"
        )
    stamp = _stamp()
    log = MigrationLog(paths, stamp)
    log(f"apply: source {source} ({conv.db_file}); plan {json.dumps(conv.plan()['counts'])}")
    storage = storage_factory(paths)  # creates and migrates the databases if they are new
    storage.config  # noqa: B018 - open (and create) both before backing them up
    storage.security  # noqa: B018
    storage.close()
    backups: dict[Path, Path] = {}
    paths.backups_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for db in (paths.config_db, paths.security_db):
        _checkpoint(db)
        backup = paths.backups_dir / f"{db.name}.bak.{stamp}"
        shutil.copyfile(db, backup)
        os.chmod(backup, 0o600)
        backups[db] = backup
        log(f"backup: {db} -> {backup}")

    from flm.storage.legacy import in_one_transaction

    stamp_rows = now_iso()
    try:
        in_one_transaction(paths.config_db, lambda conn: write_rows(conn, conv, stamp_rows))
    except Exception as exc:
        log(f"failed, rolled back: {type(exc).__name__}: {exc}")
        raise MigrationFailedError(
            f"migration failed and was rolled back ({type(exc).__name__}: {exc}); both "
            f"databases are as they were; log: {log.path}"
        ) from None
    log(f"committed: {len(conv.settings)} setting(s), {len(conv.profiles)} proxy profile(s)")

    check_storage = storage_factory(paths)
    try:
        report = run_check(check_storage)
    finally:
        check_storage.close()
    if not report["ok"]:
        for db, backup in backups.items():
            _checkpoint(db)
            _restore(db, backup)
        log(f"check failed, databases restored from backups: {report['problems']}")
        raise MigrationFailedError(
            "the migrated databases failed `flm check`; both were restored from their backups: "
            + "; ".join(report["problems"]),
            details=report,
        )
    log("check passed")
    return {
        **conv.plan(),
        "applied": True,
        "backups": {db.name: str(b) for db, b in backups.items()},
        "log": str(log.path),
    }
