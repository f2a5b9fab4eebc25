"""The audit under saturating load and a ``kill -9`` (issue 18's acceptance measurement).

FLM's gateway (``flm proxy start --no-daemon``, every security layer on) runs at a raised CPU
priority (``--nice -10``, so it has the CPU the audit's helper threads would otherwise take),
in front of the bench's mock engine. ``wrk -c64`` loads it for ``--duration`` seconds; the
gateway's RSS is sampled every second; at the end (or at ``--kill-at`` seconds) it is killed
with SIGKILL while wrk is still running. Then:

- RSS: idle (after a warm-up), the peak under load, and the peak minus idle (bar: ≤ 50 MB);
- audit: requests wrk saw answered against ``audit_logs`` rows of the chat route (taken after
  the warm-up), the difference, and that difference in seconds of the load's rate (bar: ≤ 1 s,
  i.e. at most the last bounded batch is lost);
- the gateway's own ``/metrics`` audit figures just before the kill (waits, refusals).

Usage: .venv/bin/python bench/audit_crash.py [--duration 60] [--concurrency 64] [--nice -10]
       [--kill-at SECONDS] [--out bench/results/]

Figures taken on a shared or busy machine are indicative only (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (the harness: processes, the mock engine, wrk's script)


def _chat_rows(home: Path) -> int:
    conn = sqlite3.connect(home / "security.db", timeout=30)
    try:
        row = conn.execute(
            "SELECT COUNT(*) FROM audit_logs WHERE event_type = 'request' "
            "AND endpoint = '/v1/chat/completions'"
        ).fetchone()
        return int(row[0])
    finally:
        conn.close()


def _audit_metrics(port: int) -> dict[str, float]:
    with contextlib.suppress(OSError):
        status, body = run.http_get(port, "/metrics", timeout=5)
        if status == 200:
            return {
                m[1]: float(m[3])
                for m in re.finditer(
                    r"^(flm_audit_([a-z_]+?)(?:_total)?) ([0-9.e+-]+)$", body.decode(), re.M
                )
            }
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument(
        "--nice", type=int, default=-10, help="the gateway's niceness (root only below 0)"
    )
    ap.add_argument(
        "--kill-at",
        type=float,
        default=None,
        help="seconds into the load to kill -9 (default: at its end)",
    )
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--flm", default=str(Path(sys.executable).parent / "flm"))
    args = ap.parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 2
    kill_at = args.kill_at if args.kill_at is not None else args.duration
    workdir = Path(tempfile.mkdtemp(prefix="flm-audit-crash-"))
    logdir = workdir / "logs"
    logdir.mkdir()
    signal.signal(signal.SIGTERM, run._on_signal)
    mock_port = run.free_port()
    mock = run.Managed(
        "mock", [sys.executable, str(BENCH / "mock_engine.py"), "--port", str(mock_port)], logdir
    )
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "nice": args.nice,
        "kill_at_s": kill_at,
        "load_average_before": os.getloadavg(),
    }
    try:
        run.wait_ready(mock_port, "/health", mock, 15)
        ctx = run.Ctx(
            mock,
            mock_port,
            logdir,
            workdir,
            None,
            Path(args.flm),
            Path("/none"),
            BENCH / "policy-all-on.json",
        )
        target = run.start_flm(ctx)
        home = workdir / "flm-home"
        pid = target.pid
        try:
            os.setpriority(os.PRIO_PROCESS, pid, args.nice)
        except OSError as exc:
            result["nice_note"] = f"could not set niceness {args.nice}: {exc}"
        run.smoke_check(target)
        run.run_wrk(wrk, target, workdir, 8, 2)  # warm-up
        time.sleep(1.0)  # (the warm-up's rows are flushed within 0.2 s)
        result["rss_idle_mb"] = round(run.tree_rss_mb(pid), 1)
        before = _chat_rows(home)
        samples: list[float] = []
        wrk_out: dict[str, Any] = {}

        def load() -> None:
            # wrk runs past the kill, so the kill lands under load
            wrk_out.update(run.run_wrk(wrk, target, workdir, args.concurrency, kill_at + 3))

        loader = threading.Thread(target=load)
        began = time.monotonic()
        loader.start()
        metrics: dict[str, float] = {}
        while time.monotonic() - began < kill_at:
            time.sleep(min(1.0, max(0.0, kill_at - (time.monotonic() - began))))
            samples.append(run.tree_rss_mb(pid))
            if kill_at - (time.monotonic() - began) < 1.5 and not metrics:
                metrics = _audit_metrics(target.port)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic() - began
        loader.join()
        answered = int(wrk_out.get("requests", 0)) - int(wrk_out.get("non_2xx", 0))
        rows = _chat_rows(home) - before
        rate = answered / killed if killed else 0.0
        missing = answered - rows
        result.update(
            {
                "rss_peak_mb": round(max(samples, default=0.0), 1),
                "rss_samples_mb": [round(s, 1) for s in samples],
                "wrk": wrk_out,
                "killed_after_s": round(killed, 2),
                "answered": answered,
                "audit_rows": rows,
                "missing_rows": missing,
                "missing_as_seconds_of_load": round(missing / rate, 3) if rate else None,
                "audit_metrics_before_kill": metrics,
            }
        )
        result["rss_over_idle_mb"] = round(result["rss_peak_mb"] - result["rss_idle_mb"], 1)
        result["bars"] = {
            "rss_within_50_mb_of_idle": result["rss_over_idle_mb"] <= 50,
            "at_most_1_s_of_requests_lost": (result["missing_as_seconds_of_load"] or 0) <= 1.0,
        }
    finally:
        run.Managed.stop_all()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"audit-crash-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2))
    shown = {k: v for k, v in result.items() if k not in ("rss_samples_mb", "wrk")}
    print(json.dumps(shown, indent=2))
    print(f"wrote {path}")
    with contextlib.suppress(OSError):
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
