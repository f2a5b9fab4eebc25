"""Several processes opening one database at once, fresh or one migration behind (an upgrade):
the migrations run once, in one process, and every process ends up with the full schema (the
migration transaction takes the write lock before it reads the schema version: ``BEGIN
IMMEDIATE``; a deferred one would read the old version, fail to take the lock once another
process has migrated, and fall into safe mode)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROUNDS = 12
CHILD = f"""
ROUNDS = {ROUNDS}
import sys, time
from pathlib import Path
from flm.storage.db import Database
go = Path(sys.argv[2])
deadline = time.monotonic() + 30
while not go.exists():  # a start gate: every process opens the database at the same moment
    assert time.monotonic() < deadline, "never started"
    time.sleep(0.001)
for n in range(ROUNDS):  # (each round a fresh file, raced by every process again)
    with Database(Path(sys.argv[1] + str(n)), "security") as db:
        print(db.safe_mode is None, db.schema_version == db.expected_version)
"""


@pytest.mark.slow
@pytest.mark.parametrize("behind", [False, True])
def test_processes_opening_a_database_at_once_all_get_the_schema(
    tmp_path: Path, behind: bool
) -> None:
    path, go = tmp_path / "security.db", tmp_path / "go"
    if behind:
        from flm.storage.db import Database, load_migrations

        for n in range(ROUNDS):
            with Database(
                Path(f"{path}{n}"), "security", migrations=load_migrations("security")[:-1]
            ):
                pass
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    go.touch()
    outcomes = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outcomes, strict=True):
        assert proc.returncode == 0, err
        assert out.split() == ["True", "True"] * ROUNDS, (out, err)
    import sqlite3

    for n in range(ROUNDS):
        conn = sqlite3.connect(f"{path}{n}")
        try:
            applied = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
        finally:
            conn.close()
        assert applied == sorted(set(applied))  # each migration applied once
