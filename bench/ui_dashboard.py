"""The web UI's dashboard with a busy database: 100k audit rows (a week, 6,000 in the last
hour) and 1,000 keys. Starts a real daemon with ``flm ui --no-browser`` in a temporary FLM
home, logs in, and times ``GET /`` and ``GET /data/dashboard`` over loopback.

    python bench/ui_dashboard.py [--rows 100000] [--keys 1000] [--requests 50]

The bar (issue 19): the dashboard renders in at most 100 ms. Take figures on a quiet machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit


def fill(home: Path, rows: int, keys: int) -> None:
    os.environ["FLM_HOME"] = str(home)
    from flm.core.paths import Paths
    from flm.core.timeutil import iso, utc_now
    from flm.storage import Storage

    storage = Storage(Paths.resolve())
    rng = random.Random(1)
    now = utc_now()
    key_rows = [(f"{i:08x}", f"key {i}", f"hash-{i}", iso(now)) for i in range(keys)]
    audit = []
    for i in range(rows):
        age = rng.uniform(0, 3500) if i < rows * 0.06 else rng.uniform(3700, 7 * 86400)
        audit.append((iso(now - timedelta(seconds=age)), f"{i % keys:08x}", "emu",
                      rng.choice([200] * 17 + [401, 429, 403]), rng.uniform(5, 500)))
    storage.security.write(lambda c: (
        c.executemany("INSERT INTO api_keys(id, label, hash, created_at) VALUES (?,?,?,?)",
                      key_rows),
        c.executemany("INSERT INTO audit_logs(ts, api_key_id, engine_id, status, latency_ms) "
                      "VALUES (?,?,?,?,?)", audit)))
    storage.close()


def timed(port: int, path: str, cookie: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        started = time.perf_counter()
        conn.request("GET", path, headers={"Cookie": cookie, "Accept": "application/json"})
        resp = conn.getresponse()
        resp.read()
        out.append((time.perf_counter() - started) * 1000)
        conn.close()
        assert resp.status == 200, resp.status
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "flm-home"
        home.mkdir(mode=0o700)
        fill(home, args.rows, args.keys)
        env = {**os.environ, "FLM_HOME": str(home)}
        out = subprocess.run([sys.executable, "-m", "flm", "ui", "--no-browser"], env=env,
                             capture_output=True, text=True, check=True)
        url = json.loads(out.stdout)["data"]["url"]
        parts = urlsplit(url)
        port = int(parts.port or 0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"{parts.path}?{parts.query}")
        cookie = (conn.getresponse().getheader("set-cookie") or "").split(";", 1)[0]
        conn.close()
        try:
            for path in ("/", "/data/dashboard", "/?range=day"):
                times = timed(port, path, cookie, args.requests)
                times.sort()
                print(f"{path:18} median {statistics.median(times):6.1f} ms   "
                      f"p95 {times[int(len(times) * 0.95) - 1]:6.1f} ms   (n={len(times)})")
        finally:
            pid = json.loads((home / "run" / "proxy-daemon.json").read_text())["pid"]
            os.kill(pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
