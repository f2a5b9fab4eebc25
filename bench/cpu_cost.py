"""CPU time per request of FLM gateways, interleaved: a measure that a shared machine leaves
usable when its req/s are noise.

Wall-clock throughput on a busy machine says as much about the neighbours as about the
gateway. The CPU the gateway process itself used (user + system, all its threads, from
``/proc``) divided by the requests it answered in that time is far steadier: another process
taking the CPU delays the gateway but does not make its work cost more. (Cache and frequency
effects remain, which is why the variants are measured in turns.)

Several gateways (``--flm NAME=PATH``, e.g. an older checkout's ``.venv/bin/flm`` against this
one's) each get their own ``FLM_HOME`` in front of one mock engine, with the bench's
``policy-all-on.json``; then for ``--rounds`` rounds each point (plain requests with wrk at
the given concurrencies, and 20-chunk streams at c=16 with the load client) is run against
each gateway in turn, the order rotating every round. Only one gateway is loaded at a time.
Reported per gateway and point: the median over the rounds of CPU µs per request, of req/s and
of wrk's p50/p99.

Every round starts the gateways anew (and warms each up for a second at c=64). One process of
the very same code may cost a few percent more or less CPU per request than another for as
long as it lives: four identical gateways kept for eight rounds stayed apart by up to 7 %
(with ``PYTHONHASHSEED`` fixed, still 3.6 %: memory layout as well as hash seeds). Fresh
processes each round turn that into noise that the median over the rounds evens out, instead
of a bias that looks like a difference between variants. ``--keep-processes`` starts each
gateway once, as this tool did before (faster; only for differences well above 5 %).

``--scoped`` gives every gateway a second key whose every per-key setting is on (as run.py's
``flm-scoped``), measured as the target ``NAME+scoped``: the same process as ``NAME``, called
with the other key, so its CPU per request against ``NAME``'s is what the scope's checks, the
ledger and the ``x-ratelimit-*`` headers cost, without the difference between two processes
(``--only-scoped``: only that target). A ``--flm`` gateway named ``NAME+scoped`` gets only
the scoped key, in a process of its own. At the end, each gateway's
``flm_audit_backpressure_waits_total``: how often the audit's bound held requests back.

``--profile DIR``: after the rounds, one more c=64 run (and, unless ``--no-stream``, one more
stream run, written as ``DIR/NAME-stream.txt``) per gateway under ``py-spy record``
(if installed: ``pip install py-spy``; it needs ptrace rights, as root), written as
``DIR/NAME.txt`` in py-spy's "raw" (collapsed stack) format; ``bench/cpu_cost.py --top FILE``
prints the functions with the most samples (self and total) of such a file.

Run: ``.venv/bin/python bench/cpu_cost.py --flm old=/path/to/old/.venv/bin/flm
--flm new=.venv/bin/flm [--rounds 5] [--duration 3] [--conc 1,64] [--no-stream]``.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import loadclient  # noqa: E402
import run  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
_LINE = re.compile(r":\d+\)$")


def _stat_cpu(path: str) -> float:
    with open(path, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    return _stat_cpu(f"/proc/{pid}/stat")


def loop_cpu_seconds(pid: int) -> float:
    """CPU seconds of the process's main thread (the event loop); the rest is its helper
    threads (audit, usage, database writer, key verifies)."""
    return _stat_cpu(f"/proc/{pid}/task/{pid}/stat")


def prepare(
    name: str,
    exe: Path,
    mock: run.Managed,
    mock_port: int,
    root: Path,
    cpus: Any,
    scoped: bool,
    env: dict[str, str] | None = None,
) -> tuple[run.Ctx, run.FlmSetup]:
    """A home for the gateway ``name`` (its engine, key and policy), ready to launch."""
    work = root / name
    (work / "logs").mkdir(parents=True)
    ctx = run.Ctx(
        mock, mock_port, work / "logs", work, cpus, exe, exe, BENCH / "policy-all-on.json"
    )
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:  # (the setup keeps this environment for every launch)
        setup = run.prepare_flm(ctx, name=name, key_args=run.SCOPED_KEY_ARGS if scoped else ())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ctx, setup


def launch(ctx: run.Ctx, setup: run.FlmSetup, wrk: str) -> run.Target:
    """A fresh gateway from ``setup``, checked and warmed up (caches, the first connections,
    the flushers' first batches)."""
    t = run.launch_flm(ctx, setup)
    run.smoke_check(t)
    run.run_wrk(wrk, t, ctx.workdir, 64, 1)
    return t


def audit_counters(t: run.Target) -> tuple[float | None, float | None]:
    """The gateway's ``flm_audit_backpressure_waits_total`` and
    ``flm_audit_idle_promotions_total`` (issue 18), None where not found."""
    status, body = run.http_get(t.port, "/metrics", timeout=10)
    found = []
    for name in (rb"flm_audit_backpressure_waits_total", rb"flm_audit_idle_promotions_total"):
        m = re.search(rb"^" + name + rb" (\S+)$", body, re.MULTILINE)
        found.append(float(m[1]) if status == 200 and m else None)
    return found[0], found[1]


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    """``NAME=PATH`` or ``NAME=PATH@VAR=VALUE,VAR=VALUE`` (environment for that gateway)."""
    name, _, rest = text.partition("=")
    path, _, env_text = rest.partition("@")
    env = dict(item.split("=", 1) for item in env_text.split(",") if "=" in item)
    return name, Path(path), env


def plain_point(
    wrk: str, t: run.Target, workdir: Path, conc: int, duration: float
) -> dict[str, Any]:
    before, loop0 = cpu_seconds(t.pid), loop_cpu_seconds(t.pid)
    r = run.run_wrk(wrk, t, workdir, conc, duration)
    used, loop = cpu_seconds(t.pid) - before, loop_cpu_seconds(t.pid) - loop0
    ok = r["requests"] - r["non_2xx"]
    return {
        "requests": r["requests"],
        "errors": r["errors"],
        "rps": r["rps"],
        "p50_ms": r["latency_ms"]["p50"],
        "p99_ms": r["latency_ms"]["p99"],
        # (c=1: as recorded, without wrk's coordinated-omission samples; see run.WRK_LUA)
        "p99r_ms": r.get("latency_recorded_ms", {}).get("p99"),
        "cpu_us": round(used / ok * 1e6, 1) if ok else None,
        "loop_us": round(loop / ok * 1e6, 1) if ok else None,
        "cpu_share": round(used / r["elapsed_s"], 3) if r["elapsed_s"] else None,
    }


def stream_point(t: run.Target, duration: float) -> dict[str, Any]:
    raw = loadclient.build_request(
        run.HOST, t.port, "/v1/chat/completions", run.chat_body(t.model, True), t.headers
    )
    before, loop0 = cpu_seconds(t.pid), loop_cpu_seconds(t.pid)
    res = run.aio(loadclient.run_load(run.HOST, t.port, raw, 16, duration, True, run.CHUNKS))
    used, loop = cpu_seconds(t.pid) - before, loop_cpu_seconds(t.pid) - loop0
    s = loadclient.summarize(res, stream=True)
    n = s["completed"]
    return {
        "requests": n,
        "errors": s["errors"],
        "rps": s["per_s"],
        "p50_ms": s["latency_ms"]["p50"],
        "p99_ms": s["latency_ms"]["p99"],
        "cpu_us": round(used / n * 1e6, 1) if n else None,
        "loop_us": round(loop / n * 1e6, 1) if n else None,
        "cpu_share": round(used / s["elapsed_s"], 3) if s["elapsed_s"] else None,
    }


def top(path: Path, n: int = 25) -> str:
    """The functions with the most samples in a py-spy ``raw`` (collapsed) profile."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        samples += k
        # (a frame is "function (file:line)": the line is dropped, functions are summed)
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        own[frames[-1]] += k
        for frame in set(frames):
            total[frame] += k
    out = [f"{path.name}: {samples} samples", "  self%  total%  function"]
    for frame, k in own.most_common(n):
        out.append(f"  {100 * k / samples:5.1f}  {100 * total[frame] / samples:6.1f}  {frame}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--flm",
        action="append",
        default=[],
        metavar="NAME=PATH[@VAR=VALUE,...]",
        help="a gateway to measure: its flm executable, and environment variables for it",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--conc", default="1,64")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--scoped", action="store_true")
    ap.add_argument("--only-scoped", action="store_true", help="with --scoped: no unscoped target")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument(
        "--keep-processes",
        action="store_true",
        help="start each gateway once, not anew every round (see above)",
    )
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--top", type=Path, default=None, metavar="FILE")
    args = ap.parse_args(argv)
    if args.top:
        print(top(args.top))
        return 0
    variants = [parse_variant(v) for v in args.flm] or [
        ("flm", Path(sys.executable).with_name("flm"), {})
    ]
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is needed (Debian package wrk)")
    concs = [int(c) for c in args.conc.split(",") if c]
    atexit.register(run.Managed.stop_all)
    cpus = sorted(os.sched_getaffinity(0))
    target_cpus = None
    if not args.no_pin and len(cpus) >= 2:
        target_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))
    root = Path(tempfile.mkdtemp(prefix="flm-cpu-"))
    # (its gateways' homes hold a gigabyte of audit rows after a few minutes: removed at the
    # end, once every process has stopped, however the run ends)
    atexit.register(_remove_after_stopping, root)
    (root / "logs").mkdir()
    mock_port = run.free_port()
    mock = run.Managed(
        "mock",
        [sys.executable, str(BENCH / "mock_engine.py"), "--port", str(mock_port)],
        root / "logs",
    )
    run.wait_ready(mock_port, "/health", mock, 15)
    # (one gateway process per spec; its targets: NAME and, with --scoped, NAME+scoped)
    specs: list[tuple[run.Ctx, run.FlmSetup, str | None]] = []
    for name, exe, env in variants:
        scoped_only = name.endswith("+scoped")  # (one variant with a scoped key, named so)
        ctx, setup = prepare(name, exe, mock, mock_port, root, target_cpus, scoped_only, env)
        second = run.add_scoped_key(ctx, setup) if args.scoped and not scoped_only else None
        specs.append((ctx, setup, second))
    points = [f"c{c}" for c in concs] + ([] if args.no_stream else ["stream_c16"])

    def targets_of(gateway: run.Target, second: str | None) -> list[run.Target]:
        out = [] if second is not None and args.only_scoped else [gateway]
        if second is not None:
            out.append(run.with_key(gateway, gateway.name + "+scoped", second))
        return out

    # (by target, in the order of the first round)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    counters: dict[str, list[float | None]] = {setup.name: [0.0, 0.0] for _, setup, _ in specs}
    kept: list[run.Target] = []
    if args.keep_processes:
        kept = [launch(ctx, setup, wrk) for ctx, setup, _ in specs]
    load0 = os.getloadavg()[0]
    for rnd in range(args.rounds):
        gateways = kept or [launch(ctx, setup, wrk) for ctx, setup, _ in specs]
        every = [
            t
            for g, (_, _, second) in zip(gateways, specs, strict=True)
            for t in targets_of(g, second)
        ]
        for t in every:  # (the second key: its first verify, and a warm-up, before measuring)
            if t.proc is None and (rnd == 0 or not kept):
                run.smoke_check(t)
                run.run_wrk(wrk, t, root, 64, 1)
        turn = rnd % len(every)
        order = every[turn:] + every[:turn]
        for point in points:
            for t in order:
                if point == "stream_c16":
                    r = stream_point(t, args.duration)
                else:
                    r = plain_point(wrk, t, root, int(point[1:]), args.duration)
                results.setdefault(t.name, {p: [] for p in points})[point].append(r)
                print(f"round {rnd + 1} {t.name:>16} {point:>10}: {json.dumps(r)}", flush=True)
        if not kept:
            for g in gateways:
                _add_counters(counters[g.name], audit_counters(g))
                g.stop()
    for g in kept:
        _add_counters(counters[g.name], audit_counters(g))
    summary: dict[str, Any] = {}
    print(
        f"\nmedians over {args.rounds} rounds ({args.duration:g} s each; load average "
        f"{load0:.1f} -> {os.getloadavg()[0]:.1f} on {len(cpus)} CPUs; "
        + ("the same processes throughout)" if kept else "fresh processes each round)")
    )
    print(
        f"{'target':>16} {'point':>10} {'CPU us/req':>11} {'loop us':>8} {'req/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'p99 rec.':>8}"
    )
    for name, per_point in results.items():
        for point, rows in per_point.items():
            med = {
                k: statistics.median([r[k] for r in rows if r.get(k) is not None] or [0])
                for k in ("cpu_us", "loop_us", "rps", "p50_ms", "p99_ms", "p99r_ms")
            }
            med["cpu_us_all"] = [r["cpu_us"] for r in rows]
            med["errors"] = sum(r["errors"] for r in rows)
            summary.setdefault(name, {})[point] = med
            print(
                f"{name:>16} {point:>10} {med['cpu_us']:>11.1f} {med['loop_us']:>8.1f} "
                f"{med['rps']:>9.0f} "
                f"{med['p50_ms']:>8.3f} {med['p99_ms']:>8.3f} "
                + (f"{med['p99r_ms']:>8.3f}" if med["p99r_ms"] else f"{'-':>8}")
                + (f"  errors {med['errors']}" if med["errors"] else "")
            )
    for name, (waits, promoted) in counters.items():  # (how often the audit's bound held
        summary.setdefault(name, {})["audit_backpressure_waits"] = waits  # requests back)
        summary[name]["audit_idle_promotions"] = promoted
        print(
            f"{name:>16} audit back-pressure waits: {waits}; "
            f"helpers put back from the idle class: {promoted}"
        )
    if args.profile:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        args.profile.mkdir(parents=True, exist_ok=True)
        kinds = ("c64",) if args.no_stream else ("c64", "stream")
        gateways = kept or [launch(ctx, setup, wrk) for ctx, setup, _ in specs]
        for t, kind in [(t, kind) for t in gateways for kind in kinds]:
            out = args.profile / (f"{t.name}.txt" if kind == "c64" else f"{t.name}-stream.txt")
            rec = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(t.pid),
                    "--rate",
                    "500",
                    "--format",
                    "raw",
                    "--gil",
                    "--nonblocking",
                    "--output",
                    str(out),
                    "--duration",
                    str(int(args.duration) + 1),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            if kind == "stream":
                stream_point(t, args.duration)
            else:
                run.run_wrk(wrk, t, root, 64, args.duration)
            rec.wait(timeout=60)
            if out.exists():
                print(top(out, 20))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "rounds": results}, indent=1))
    run.Managed.stop_all()
    return 0


def _remove_after_stopping(root: Path) -> None:
    run.Managed.stop_all()
    shutil.rmtree(root, ignore_errors=True)


def _add_counters(into: list[float | None], got: tuple[float | None, float | None]) -> None:
    """Sum one process's audit counters into a gateway's totals (None once one is missing)."""
    for i, value in enumerate(got):
        current = into[i]
        into[i] = None if value is None or current is None else current + value


if __name__ == "__main__":
    sys.exit(main())
