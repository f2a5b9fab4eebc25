"""Many processes writing at once never see "database is locked"; kill -9 never corrupts."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import flm_subprocess

_CREATE_MANY = """
import json, sys
from flm.cli import main
ok = 0
for i in range(int(sys.argv[1])):
    code = main(["api-keys", "create", "--label", f"p{sys.argv[2]}-{i}"])
    ok += code == 0
sys.stderr.write(json.dumps({"ok": ok}) + "\\n")
"""


def test_eight_processes_create_200_keys_without_lock_errors(flm_home: Path) -> None:
    flm_subprocess("check")  # create both databases once
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATE_MANY, "25", str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(8)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "locked" not in out + err
        assert json.loads(err.strip().splitlines()[-1]) == {"ok": 25}
        assert all("error" not in json.loads(line) for line in out.splitlines())
    conn = sqlite3.connect(flm_home / "security.db")
    assert conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] == 200
    assert conn.execute("SELECT COUNT(DISTINCT hash) FROM api_keys").fetchone()[0] == 200
    conn.close()


_BURST = """
import sys
from flm.core.paths import Paths
from flm.storage import Storage
storage = Storage(Paths.resolve())
cfg, sec = storage.config, storage.security
i = 0
while True:
    i += 1
    futures = [
        cfg.submit(lambda c, i=i: c.execute(
            "INSERT OR REPLACE INTO settings(key, value, updated_at) VALUES (?, ?, 't')",
            (f"k{i % 500}", "x" * (i % 300)))),
        sec.submit(lambda c, i=i: c.execute(
            "INSERT INTO audit_logs(ts, endpoint, status, details_json) VALUES ('t', ?, 200, ?)",
            (f"/v1/{i}", "y" * (i % 700)))),
    ]
    for f in futures:
        f.result()
    if i == 50:
        sys.stdout.write("started\\n")
        sys.stdout.flush()
"""


def test_kill_9_during_write_burst_leaves_databases_healthy(flm_home: Path) -> None:
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", _BURST], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "started"
            conn = sqlite3.connect(flm_home / "security.db")
            deadline = time.monotonic() + 30
            # wait until the burst is well under way (rows keep arriving), then kill mid-write
            while conn.execute("SELECT COUNT(*) FROM audit_logs").fetchone()[0] < 200:
                assert time.monotonic() < deadline
            conn.close()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL
        check = flm_subprocess("check")
        assert check.returncode == 0, check.stdout
        assert json.loads(check.stdout)["data"]["ok"] is True
