"""``--workers``: the gateway's CPU time per request with N processes against one (issue 24).

For each ``--workers`` value (default ``1,2``) it starts FLM in front of the bench's mock engine
(every security layer on, ``policy-all-on.json``, one key, a fresh ``FLM_HOME``), in the
foreground with that many workers and the same ``--state-backend`` for every value (a
redis-server it starts on a free loopback port, or ``--state-backend URL``), warms it up, and
loads it with ``wrk`` (plain chat completions). Before and after the load it reads
``utime + stime`` from ``/proc/PID/stat`` of every gateway process (the supervisor and its
workers; the pids must be the same after the load, a restarted worker spoils the point), and
reports:

- ``cpu_ms_per_request``: the CPU those processes used during the load, summed, divided by the
  requests answered (2xx) — the bar: with 2 workers within 15% of 1 worker's;
- ``rps``, latency percentiles, the requests each worker answered.

Usage: .venv/bin/python bench/workers.py [--workers 1,2] [--duration 10] [--concurrency 64]
       [--state-backend URL] [--out bench/results/]

This machine also runs the load and the engine: req/s only grows with workers where there are
free cores; the CPU-per-request figure is the one to compare. Take figures on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (the harness: processes, the mock engine, wrk's script)

#: Starts a foreground proxy from a JSON config (``flm proxy start --no-daemon`` with the
#: options as the CLI passes them, including ``state_backend`` and ``workers``).
FOREGROUND = """
import json, sys
from flm.core.jsonlog import setup_logging
from flm.core.paths import Paths
from flm.proxy.foreground import run_foreground
from flm.services.context import Context
setup_logging("WARNING")
run_foreground(Context(Paths.resolve()), json.loads(sys.argv[1]))
"""


def proc_cpu_seconds(pid: int) -> float:
    """``utime + stime`` of one process from ``/proc/PID/stat``, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # (fields after the command: state is [0], utime is field 14 of the line, so [11])
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_pids(supervisor: int) -> list[int]:
    """The supervisor and its workers (its direct children running ``flm.proxy.worker``)."""
    import psutil

    out = [supervisor]
    for child in psutil.Process(supervisor).children():
        try:
            if "flm.proxy.worker" in " ".join(child.cmdline()):
                out.append(child.pid)
        except psutil.Error:
            continue
    return out


def start_redis(logdir: Path) -> tuple[run.Managed, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise run.Skip("redis-server is not installed (Debian package redis-server)")
    port = run.free_port()
    proc = run.Managed(
        "redis",
        [binary, "--port", str(port), "--bind", run.HOST, "--save", "", "--appendonly", "no"],
        logdir,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((run.HOST, port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://{run.HOST}:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline or not proc.alive():
            raise run.Skip(f"redis-server did not answer: {proc.tail()}")
        time.sleep(0.05)


def start_gateway(
    ctx: run.Ctx, workers: int, state_backend: str, flm_env: dict[str, str]
) -> run.Target:
    port = run.free_port()
    config = {"mode": "local-http", "port": port, "bind": run.HOST, "workers": workers}
    config["state_backend"] = state_backend
    proc = run.Managed(
        f"flm-workers-{workers}",
        [sys.executable, "-c", FOREGROUND, json.dumps(config)],
        ctx.logdir,
        env=flm_env,
    )
    target = run.Target(
        f"flm-workers-{workers}",
        port,
        "flm://mock/bench-model",
        {"Authorization": f"Bearer {flm_env['BENCH_KEY']}"},
        proc.pid,
        proc=proc,
    )
    target.startup_s = run.wait_ready(port, "/health", proc, 60)
    deadline = time.monotonic() + 30
    while len(gateway_pids(proc.pid)) < workers:  # (the workers start after worker 0 serves)
        if time.monotonic() > deadline:
            raise run.Skip(f"only {len(gateway_pids(proc.pid))} of {workers} workers came up")
        time.sleep(0.05)
    return target


def prepare_home(ctx: run.Ctx, home: Path) -> dict[str, str]:
    home.mkdir()
    env = dict(os.environ)
    env["FLM_HOME"] = str(home)
    url = f"http://{run.HOST}:{ctx.mock_port}"
    run._flm(ctx, env, "engines", "add", "--kind", "vllm", "--url", url, "--id", "mock")
    out = run._flm(ctx, env, "api-keys", "create", "--label", "bench")
    env["BENCH_KEY"] = json.loads(out)["data"]["key"]
    run._flm(ctx, env, "security", "policy", "set", "--file", str(ctx.policy))
    return env


def measure(
    ctx: run.Ctx, wrk: str, workers: int, state_backend: str, args: argparse.Namespace
) -> dict[str, Any]:
    env = prepare_home(ctx, ctx.workdir / f"home-{workers}")
    target = start_gateway(ctx, workers, state_backend, env)
    try:
        run.smoke_check(target)
        run.run_wrk(wrk, target, ctx.workdir, args.concurrency, args.warmup)
        pids = gateway_pids(target.pid)
        before = {pid: proc_cpu_seconds(pid) for pid in pids}
        load = run.run_wrk(wrk, target, ctx.workdir, args.concurrency, args.duration)
        after_pids = gateway_pids(target.pid)
        after = {pid: proc_cpu_seconds(pid) for pid in pids}
        if sorted(after_pids) != sorted(pids):
            raise run.Skip(f"the workers changed during the load: {pids} -> {after_pids}")
        per_pid = {pid: round(after[pid] - before[pid], 3) for pid in pids}
        answered = load["requests"] - load.get("non_2xx", 0)
        cpu = sum(per_pid.values())
        refused = load["requests"] - answered
        if load["requests"] and refused / load["requests"] > 0.01:
            # (fast refusals would make the CPU per answered request meaningless)
            print(
                f"workers={workers}: {refused} of {load['requests']} responses were not 2xx: "
                "this point is not valid (see the gateway's log in the bench folder)",
                file=sys.stderr,
            )
        return {
            "valid": not (load["requests"] and refused / load["requests"] > 0.01),
            "workers": workers,
            "pids": pids,
            "cpu_s_per_process": per_pid,
            "cpu_s": round(cpu, 3),
            "answered": answered,
            "cpu_ms_per_request": round(1000 * cpu / answered, 4) if answered else None,
            **{k: load[k] for k in ("rps", "errors", "non_2xx", "latency_ms", "elapsed_s")},
        }
    finally:
        target.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (1,2)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--state-backend", default=None, help="default: a redis-server started here")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--flm", default=str(Path(sys.executable).parent / "flm"))
    args = ap.parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.workers.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="flm-workers-bench-"))
    logdir = workdir / "logs"
    logdir.mkdir()
    signal.signal(signal.SIGTERM, run._on_signal)
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "points": [],
    }
    try:
        backend = args.state_backend
        if backend is None:
            _redis, backend = start_redis(logdir)
        mock_port = run.free_port()
        mock = run.Managed(
            "mock",
            [sys.executable, str(BENCH / "mock_engine.py"), "--port", str(mock_port)],
            logdir,
        )
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
        for n in counts:
            point = measure(ctx, wrk, n, backend, args)
            result["points"].append(point)
            print(
                f"workers={n}: {point['rps']} req/s, {point['cpu_ms_per_request']} ms CPU per "
                f"request ({point['cpu_s']} s over {point['answered']} answered), "
                f"p50 {point['latency_ms']['p50']} ms",
                flush=True,
            )
    except run.Skip as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        return 1
    finally:
        run.Managed.stop_all()
        # (the homes' audit databases reach a gigabyte over a few runs)
        shutil.rmtree(workdir, ignore_errors=True)
    base = next((p for p in result["points"] if p["workers"] == 1), None)
    for p in result["points"]:
        if base and base["cpu_ms_per_request"] and p["cpu_ms_per_request"]:
            if not (base["valid"] and p["valid"]):
                print(f"workers={p['workers']}: no comparison (a point had refusals)")
                continue
            p["cpu_per_request_vs_1"] = round(
                p["cpu_ms_per_request"] / base["cpu_ms_per_request"], 3
            )
            p["within_bar"] = p["cpu_per_request_vs_1"] <= 1.15
            print(
                f"workers={p['workers']}: CPU per request {p['cpu_per_request_vs_1']}x one "
                f"process's (bar <= 1.15: {'ok' if p['within_bar'] else 'MISSED'})"
            )
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"workers-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
