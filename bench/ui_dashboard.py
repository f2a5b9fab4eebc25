"""The web UI's dashboard with a busy database: 100k audit rows (a week, 6,000 in the last
hour) and 1,000 keys, written by :mod:`flm.testing.busy`. Starts a real daemon with
``flm ui --no-browser`` in a temporary FLM home, logs in, and times the dashboard, its data
endpoint (what an open page polls), a per-engine view, the API page (1,000 keys) and a key's
page over loopback: the server's own time (``Server-Timing``) and the client's.

    python bench/ui_dashboard.py [--rows 100000] [--keys 1000] [--requests 50] [--cold 5]
    python bench/ui_dashboard.py --gateway [--duration 10] [--concurrency 64]

Two figures per page: "cold" is a render after the UI's figure cache expired (the window's
audit rows are read again: what a first visit or a poll every STATS_TTL_S costs), "warm" a
render within it (what extra polls cost). The bar (issue 19): the dashboard renders in at
most 100 ms.

``--gateway`` measures the other bar, a UI left open does not slow the gateway: the daemon
hosts a proxy in front of the bench's mock engine, and the gateway's c=64 throughput (the
bench's load client, plain chat completions) is taken without a UI, with a UI polling
``/data/dashboard`` every second (five times the page's own rate), and without again; the
figure is the ratio to the mean of the two runs without (the bar: at least 95%). Take figures
on a quiet machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit


def fill(home: Path, rows: int, keys: int) -> None:
    os.environ["FLM_HOME"] = str(home)
    from flm.core.paths import Paths
    from flm.storage import Storage
    from flm.testing import busy

    storage = Storage(Paths.resolve())
    started = time.perf_counter()
    busy.fill(storage, rows, keys)
    storage.close()
    print(f"filled {rows} audit rows and {keys} keys in {time.perf_counter() - started:.1f} s")


def get(port: int, path: str, cookie: str) -> tuple[float, float]:
    """(server ms from Server-Timing, client ms) of one GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    conn.request("GET", path, headers={"Cookie": cookie, "Accept": "application/json"})
    resp = conn.getresponse()
    resp.read()
    client = (time.perf_counter() - started) * 1000
    conn.close()
    assert resp.status == 200, (path, resp.status)
    timing = resp.getheader("server-timing") or "app;dur=nan"
    return float(timing.split("dur=", 1)[1]), client


def _median(samples: list[tuple[float, float]], which: int) -> float:
    return statistics.median(s[which] for s in samples) if samples else float("nan")


def gateway(args: argparse.Namespace) -> int:
    import asyncio
    import threading

    sys.path.insert(0, str(Path(__file__).parent))
    import loadclient

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "flm-home"
        home.mkdir(mode=0o700)
        env = {**os.environ, "FLM_HOME": str(home)}
        mock = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "mock_engine.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        daemon_pid = None
        try:
            assert mock.stdout is not None
            mock_port = int(mock.stdout.readline().split()[1])

            def flm(*cmd: str) -> dict:  # type: ignore[type-arg]
                out = subprocess.run(
                    [sys.executable, "-m", "flm", *cmd],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                return json.loads(out.stdout)["data"]  # type: ignore[no-any-return]

            flm(
                "engines",
                "add",
                "--kind",
                "vllm",
                "--url",
                f"http://127.0.0.1:{mock_port}",
                "--id",
                "mock",
            )
            key = flm("api-keys", "create", "--label", "bench")["key"]
            with socket_port() as port:
                pass
            flm("proxy", "start", "--port", str(port))
            daemon_pid = json.loads((home / "run" / "proxy-daemon.json").read_text())["pid"]
            body = json.dumps(
                {
                    "model": "flm://mock/bench-model",
                    "max_tokens": 32,
                    "messages": [{"role": "user", "content": "Say hello."}],
                }
            ).encode()
            raw = loadclient.build_request(
                "127.0.0.1", port, "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}
            )

            def load() -> float:
                res = asyncio.run(
                    loadclient.run_load(
                        "127.0.0.1", port, raw, args.concurrency, args.duration, stream=False
                    )
                )
                summary = loadclient.summarize(res, stream=False)
                assert not summary["errors"], summary
                return float(summary["per_s"])

            load()  # warm-up
            before = load()
            url = urlsplit(flm("ui", "--no-browser")["url"])
            conn = http.client.HTTPConnection("127.0.0.1", int(url.port or 0), timeout=30)
            conn.request("GET", f"{url.path}?{url.query}")
            cookie = (conn.getresponse().getheader("set-cookie") or "").split(";", 1)[0]
            conn.close()
            stop = threading.Event()
            polls: list[float] = []

            def poll() -> None:
                while not stop.wait(1.0):
                    polls.append(get(int(url.port or 0), "/data/dashboard", cookie)[0])

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            during = load()
            stop.set()
            poller.join()
            after = load()
            base = (before + after) / 2
            print(
                f"c={args.concurrency} rps without UI {before:.0f} / {after:.0f}, "
                f"with a UI polling every 1 s {during:.0f}: {during / base:.1%} "
                f"({len(polls)} polls, median {statistics.median(polls):.1f} ms)"
            )
        finally:
            if daemon_pid is not None:
                os.kill(daemon_pid, signal.SIGTERM)
            mock.terminate()
            mock.wait(10)
            if mock.stdout is not None:
                mock.stdout.close()
    return 0


class socket_port:
    """A free loopback port (bound and released on exit)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--requests", type=int, default=50, help="warm requests per page")
    parser.add_argument(
        "--cold", type=int, default=3, help="cold requests per page (one per cache expiry)"
    )
    parser.add_argument(
        "--gateway",
        action="store_true",
        help="measure the gateway's throughput with and without a UI polling",
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    if args.gateway:
        return gateway(args)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "flm-home"
        home.mkdir(mode=0o700)
        fill(home, args.rows, args.keys)
        env = {**os.environ, "FLM_HOME": str(home)}
        out = subprocess.run(
            [sys.executable, "-m", "flm", "ui", "--no-browser"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        url = json.loads(out.stdout)["data"]["url"]
        parts = urlsplit(url)
        port = int(parts.port or 0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"{parts.path}?{parts.query}")
        cookie = (conn.getresponse().getheader("set-cookie") or "").split(";", 1)[0]
        conn.close()
        try:
            from flm.testing.busy import key_id
            from flm.ui.app import STATS_TTL_S

            paths = [
                "/",
                "/data/dashboard?range=hour",
                "/?range=day",
                "/data/dashboard?range=day",
                "/?engine=emu-b",
                "/api",
                f"/api/key?id={key_id(3)}&range=day",
            ]
            for path in paths:
                get(port, path, cookie)  # first visit: engine detection, templates compiled
            cold: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
            for _ in range(args.cold):
                for path in paths:
                    time.sleep(STATS_TTL_S + 0.2)  # the figure cache has expired
                    cold[path].append(get(port, path, cookie))
            print(f"{'page':34} {'cold server/client ms':>22} {'warm server/client ms':>22}")
            for path in paths:
                warm = [get(port, path, cookie) for _ in range(args.requests)]
                print(
                    f"{path:34} {_median(cold[path], 0):10.1f} / {_median(cold[path], 1):7.1f}   "
                    f"{_median(warm, 0):10.1f} / {_median(warm, 1):7.1f}"
                )
            worst = max(_median(cold[p], 0) for p in paths[:4])
            print(f"dashboard (hour/day, page/data) cold median, worst: {worst:.1f} ms (bar 100)")
        finally:
            pid = json.loads((home / "run" / "proxy-daemon.json").read_text())["pid"]
            os.kill(pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
