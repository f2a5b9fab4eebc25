"""SQLite access: PRAGMAs, numbered migrations, safe mode and the single writer.

Shape:

* ``Database.open()`` creates the file (0600, directory 0700), switches it to WAL and applies
  pending migrations in one ``BEGIN IMMEDIATE`` transaction. If that fails the database stays
  usable for reads and enters *safe mode*: every write raises ``MigrationFailedError`` naming the
  recovery steps.
* Reads run on a per-thread connection (``query``/``query_one``).
* Every write goes through one writer thread fed by a queue (``write`` waits for the result,
  ``submit`` does not). The writer groups whatever is queued into one transaction, each job in its
  own savepoint, so a burst of audit rows costs one commit and one failing job never takes the
  others with it. Across processes, ``BEGIN IMMEDIATE`` with a busy timeout and a retry loop
  serialises writers, so concurrent CLI and daemon writes wait instead of failing with
  "database is locked".
"""

from __future__ import annotations

import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from flm.core.errors import MigrationFailedError, RepoError
from flm.core.paths import make_dir, touch_private_file
from flm.core.threads import Idling, background_thread

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5_000
#: How long a writer keeps retrying a locked database before giving up.
LOCK_DEADLINE_S = 60.0
#: At most this many queued jobs share one transaction.
MAX_BATCH = 256

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class SafeMode:
    """Why a database is read-only."""

    db_name: str
    reason: str
    #: The file cannot be written (nothing is wrong with it).
    read_only: bool = False

    def message(self) -> str:
        if self.read_only:
            return (
                f"{self.db_name}.db is read-only: {self.reason}. Reads work; writes are "
                "refused. To write again, make the file and its directory writable "
                "(permissions, a read-only mount, a full disk)."
            )
        return (
            f"{self.db_name}.db is in read-only safe mode: {self.reason}. Reads still work; "
            "writes are refused. To recover: (1) run `flm check --verbose` to see the state; "
            f"(2) restore a backup with `flm security backup restore --file FILE` "
            "(security.db) or move the damaged file aside so FLM recreates it; "
            "(3) if FLM was just upgraded or downgraded, reinstall the matching version."
        )


def load_migrations(db_name: str) -> list[Migration]:
    """The numbered SQL files shipped in ``flm/storage/migrations/<db_name>/``, in order."""
    folder = resources.files("flm.storage") / "migrations" / db_name
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RepoError(f"migrations for {db_name} are not numbered 0001..N: {versions}")
    return found


def split_sql(script: str) -> list[str]:
    """Split a script into complete statements (triggers with inner ``;`` stay whole)."""
    statements: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        if not buf and (not line.strip() or line.lstrip().startswith("--")):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip())
            buf = ""
    if buf.strip():
        raise RepoError("migration script ends with an incomplete statement")
    return statements


def _is_locked(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _connect(path: Path, *, readonly: bool = False, uri: str | None = None) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(
            uri or path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
            uri=uri is not None,
        )
    except sqlite3.Error as exc:
        raise RepoError(f"cannot open {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: Future[Any]


_STOP = object()


class Database:
    """One SQLite file with its migrations, readers and single writer."""

    def __init__(
        self,
        path: Path,
        name: str,
        migrations: Sequence[Migration] | None = None,
    ) -> None:
        self.path = path
        self.name = name
        self._migrations = list(migrations) if migrations is not None else None
        self.schema_version = 0
        self.expected_version = 0
        self.safe_mode: SafeMode | None = None
        #: Why the file was opened read-only (it cannot be written: a read-only file or file
        #: system); ``None`` when it is writable. Writes are refused (safe mode) meanwhile.
        self.read_only: str | None = None
        #: How readers open the file (a ``file:`` URI when it is read-only).
        self._read_uri: str | None = None
        #: (device, inode) of the file when it was opened: a file deleted or replaced under a
        #: running process is noticed (:meth:`identity_problem`) and never written blindly.
        self._identity: tuple[int, int] | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        #: The writer thread's scheduling class: a job may run in the idle class
        #: (:func:`flm.storage.records.write_batch` does for the audit's paced batches).
        self.idling = Idling()
        self._opened = False

    # --- lifecycle ------------------------------------------------------------------------------

    def open(self) -> Database:
        if self._opened:
            return self
        migrations = (
            self._migrations if self._migrations is not None else load_migrations(self.name)
        )
        self.expected_version = migrations[-1].version if migrations else 0
        why = self._unwritable()
        if why is not None:
            self._open_read_only(why)
            return self
        make_dir(self.path.parent)  # (FLM's home is made private by Storage)
        touch_private_file(self.path)
        conn = _connect(self.path)
        try:
            self._set_wal(conn)
            self._migrate(conn, migrations)
        finally:
            conn.close()
        self._remember_identity()
        self._opened = True
        return self

    def _remember_identity(self) -> None:
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def identity_problem(self) -> str | None:
        """Why the file at ``path`` is no longer the one opened (deleted, or replaced by
        another file), or ``None``. Checked before every write batch and on reload."""
        if self._identity is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return (
                f"{self.path} was deleted while FLM had it open; writes are refused "
                "(they would be lost): restart FLM's proxies to use a new file"
            )
        except OSError as exc:
            return f"{self.path} cannot be checked: {exc}"
        if (st.st_dev, st.st_ino) != self._identity:
            return (
                f"{self.path} was replaced by another file while FLM had it open; writes "
                "are refused (they would go to the old file): restart FLM's proxies to use "
                "the new one"
            )
        return None

    def _unwritable(self) -> str | None:
        """Why an existing database file cannot be written, or ``None``."""
        if not self.path.exists():
            return None
        if not os.access(self.path, os.W_OK):
            return "the file is read-only"
        if not os.access(self.path.parent, os.W_OK):
            # (SQLite needs its -wal and -shm files beside the database)
            wal = self.path.with_name(self.path.name + "-wal")
            if not (wal.exists() and os.access(wal, os.W_OK)):
                return "its directory is read-only"
        return None

    def _open_read_only(self, why: str) -> None:
        """Open a database that cannot be written for reading only, in safe mode (every write
        refused with the reason). Without its -shm file beside it (a read-only directory) a
        WAL database opens as immutable: nothing can change it meanwhile anyway."""
        last: Exception | None = None
        for uri in (f"file:{self.path}?mode=ro", f"file:{self.path}?mode=ro&immutable=1"):
            try:
                conn = _connect(self.path, readonly=True, uri=uri)
                try:
                    row = conn.execute(
                        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
                    ).fetchone()
                finally:
                    conn.close()
            except (RepoError, sqlite3.Error) as exc:
                last = exc
                continue
            self._read_uri = uri
            self.schema_version = int(row[0])
            self._remember_identity()
            break
        else:
            raise RepoError(f"cannot open {self.path} ({why}) for reading: {last}")
        self.read_only = f"{self.path} is opened read-only: {why}"
        self.safe_mode = SafeMode(self.name, f"{why} ({self.path})", read_only=True)
        self._opened = True

    def close(self) -> None:
        writer = self._writer
        if writer is not None and writer.is_alive():
            self._queue.put(_STOP)
            writer.join(timeout=30)
        self._writer = None
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._local = threading.local()
        self._opened = False

    def __enter__(self) -> Database:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        deadline = time.monotonic() + LOCK_DEADLINE_S
        while True:
            try:
                # (``synchronous`` is a connection's setting, not the file's: every
                # connection keeps SQLite's FULL, so a commit is synced before it returns and an
                # acknowledged write survives a power loss; the audit pays one sync a batch)
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or time.monotonic() > deadline:
                    raise RepoError(f"cannot set WAL mode on {self.path}: {exc}") from exc
                time.sleep(0.01)
            except sqlite3.DatabaseError as exc:
                raise RepoError(f"{self.path} is not a usable SQLite database: {exc}") from exc
        if str(mode).lower() != "wal":
            raise RepoError(f"{self.path}: journal_mode is {mode}, expected wal")

    def _migrate(self, conn: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
        deadline = time.monotonic() + LOCK_DEADLINE_S
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or time.monotonic() > deadline:
                    raise RepoError(f"cannot lock {self.path} for migrations: {exc}") from exc
                time.sleep(0.01)
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
            current = int(row[0])
            self.schema_version = current
            if current > self.expected_version:
                conn.execute("ROLLBACK")
                self.safe_mode = SafeMode(
                    self.name,
                    f"its schema version {current} is newer than this FLM knows "
                    f"({self.expected_version})",
                )
                return
            pending = [m for m in migrations if m.version > current]
            for migration in pending:
                try:
                    for statement in split_sql(migration.sql):
                        conn.execute(statement)
                except (sqlite3.Error, RepoError) as exc:
                    conn.execute("ROLLBACK")
                    self.safe_mode = SafeMode(
                        self.name,
                        f"migration {migration.version:04d}_{migration.name} failed ({exc}); "
                        f"the schema stays at version {current}",
                    )
                    return
                conn.execute(
                    "INSERT INTO schema_migrations(version, name, applied_at) "
                    "VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
                    (migration.version, migration.name),
                )
            conn.execute("COMMIT")
            self.schema_version = self.expected_version if pending else current
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise RepoError(f"migrating {self.path} failed: {exc}") from exc

    # --- reads ----------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if not self._opened:
                self.open()
            conn = _connect(self.path, readonly=True, uri=self._read_uri)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._reader().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise RepoError(f"reading {self.name}.db failed: {exc}") from exc

    def query_one(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> sqlite3.Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same state."""
        conn = self._reader()
        try:
            conn.execute("BEGIN")
            yield conn
        except sqlite3.Error as exc:
            raise RepoError(f"reading {self.name}.db failed: {exc}") from exc
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    # --- writes ---------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.safe_mode is not None:
            raise MigrationFailedError(self.safe_mode.message())
        if not self._opened:
            self.open()
            if self.safe_mode is not None:
                raise MigrationFailedError(self.safe_mode.message())

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Queue ``fn(conn)`` for the writer thread; it runs inside a transaction."""
        self._check_writable()
        future: Future[T] = Future()
        self._ensure_writer()
        self._queue.put(_Job(fn, future))
        return future

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the writer thread inside a transaction and return its result."""
        return self.submit(fn).result()

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        """Write one statement; returns the number of rows changed."""

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        return self.write(run)

    def _ensure_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=self._writer_loop, name=f"flm-writer-{self.name}", daemon=True
                )
                self._writer.start()

    def _writer_loop(self) -> None:
        background_thread()
        self.idling.bind()
        conn = _connect(self.path)
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                assert isinstance(item, _Job)
                batch = [item]
                stop_after = False
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stop_after = True
                        break
                    assert isinstance(more, _Job)
                    batch.append(more)
                try:
                    self._run_batch(conn, batch)
                finally:
                    self.idling.leave()  # (a job may have entered the idle class)
                if stop_after:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        jobs = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        problem = self.identity_problem()
        if problem is not None:
            error = RepoError(problem)
            for job in jobs:
                job.future.set_exception(error)
            return
        results: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            self._begin(conn)
            for index, job in enumerate(jobs):
                savepoint = f"job{index}"
                conn.execute(f"SAVEPOINT {savepoint}")
                try:
                    value = job.fn(conn)
                except BaseException as exc:
                    conn.execute(f"ROLLBACK TO {savepoint}")
                    conn.execute(f"RELEASE {savepoint}")
                    results.append((job, None, exc))
                else:
                    conn.execute(f"RELEASE {savepoint}")
                    results.append((job, value, None))
            self._commit(conn)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = RepoError(f"writing {self.name}.db failed: {exc}")
            for job in jobs:
                job.future.set_exception(error)
            return
        for job, value, job_exc in results:
            if job_exc is None:
                job.future.set_result(value)
            elif isinstance(job_exc, sqlite3.Error):
                wrapped = RepoError(f"writing {self.name}.db failed: {job_exc}")
                wrapped.__cause__ = job_exc
                job.future.set_exception(wrapped)
            else:
                job.future.set_exception(job_exc)

    @staticmethod
    def _retry_locked(conn: sqlite3.Connection, sql: str) -> None:
        deadline = time.monotonic() + LOCK_DEADLINE_S
        delay = 0.005
        while True:
            try:
                conn.execute(sql)
                return
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _begin(self, conn: sqlite3.Connection) -> None:
        self._retry_locked(conn, "BEGIN IMMEDIATE")

    def _commit(self, conn: sqlite3.Connection) -> None:
        self._retry_locked(conn, "COMMIT")

    # --- checks ---------------------------------------------------------------------------------

    def integrity_problems(self) -> list[str]:
        """``PRAGMA integrity_check`` and ``foreign_key_check``; an empty list means healthy."""
        problems: list[str] = []
        rows = self.query("PRAGMA integrity_check")
        messages = [str(r[0]) for r in rows]
        if messages != ["ok"]:
            problems.extend(f"integrity_check: {m}" for m in messages)
        for row in self.query("PRAGMA foreign_key_check"):
            problems.append(f"foreign_key_check: table {row[0]} rowid {row[1]} -> {row[2]}")
        return problems
