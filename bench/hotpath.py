"""FLM's own time on the critical path of one non-streamed chat request, without the network.

The c=1 "added latency" of the benchmark is the machine's hop floor (what any extra process
costs) plus FLM's own work between two moments:

- **A**: the client's request bytes arrive → the request to the engine is written;
- **B**: the engine's reply bytes arrive → the reply to the client is written.

Everything else FLM does (metrics, the audit record, token counting) happens after the reply
is written. This tool feeds the real gateway (every security layer of
``policy-all-on.json``, the real server protocol, the real engine client) through fake
transports on both sides, so no system call or other process is involved, and reports the
median of A and B over many requests, spaced out as at concurrency 1. With ``--bytecodes`` it
instead counts the Python bytecodes each function runs per request in A, B and after the
reply (a tracing run: the count is exact, the timing of that run is not).

Run: ``.venv/bin/python bench/hotpath.py [--requests 5000] [--bytecodes] [--scoped] [--pool]
[--state-backend URL|spawn]`` (``--scoped``: the key has a model scope, limits, budgets and an
expiry, as in run.py's ``flm-scoped`` target; ``--pool``: the request names
``flm://pool:bench/bench-model``, a pool of two engines, so the difference to a run without it
is the pool's cost; ``--state-backend``: the gateway keeps its shared state in that Redis, or
in a private ``redis-server`` on a free loopback port with ``spawn``: A then includes the one
Redis round trip per request, and the difference to a run without it is the Redis backend's
added latency). Pin it to a core (``taskset -c 0``) for steadier figures. Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import mock_engine  # noqa: E402

BODY = b'{"model":"flm://mock/bench-model","messages":[{"role":"user","content":"hi"}]}'
POOL_BODY = BODY.replace(b"flm://mock/", b"flm://pool:bench/")
STREAM_BODY = BODY[:-1] + b',"stream":true}'

now = time.perf_counter


#: ``--scoped``: the key of run.py's ``flm-scoped`` target (every per-key check on).
SCOPED_KEY_ARGS = (
    "--models",
    "flm://mock/*",
    "--rpm",
    "100000000",
    "--burst",
    "100000000",
    "--tpm",
    "1000000000",
    "--daily-tokens",
    "1000000000000",
    "--daily-requests",
    "1000000000000",
    "--expires",
    "30d",
)


def _prepare_home(home: Path, scoped: bool = False, pool: bool = False) -> str:
    """A fresh FLM home with the mock engine registered, a key and every security layer on
    (``scoped``: the key has a model scope, limits, budgets and an expiry)."""
    flm = [sys.executable, "-m", "flm"]
    env = {**os.environ, "FLM_HOME": str(home)}

    def run(*args: str) -> str:
        return subprocess.run(
            [*flm, *args], env=env, check=True, capture_output=True, text=True
        ).stdout

    run("engines", "add", "--kind", "vllm", "--url", "http://127.0.0.1:9", "--id", "mock")
    if pool:
        run("engines", "add", "--kind", "vllm", "--url", "http://127.0.0.1:10", "--id", "mock2")
        run("engines", "pool", "create", "bench", "--member", "mock", "mock2")
    import json

    key: str = json.loads(
        run("api-keys", "create", "--label", "hotpath", *(SCOPED_KEY_ARGS if scoped else ()))
    )["data"]["key"]
    run("security", "policy", "set", "--file", str(BENCH / "policy-all-on.json"))
    return key


class _Marks:
    """Timestamps of the four moments, and the segment the request is in."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.segment = "-"


def _fake_transports(marks: _Marks) -> tuple[Any, Any]:
    from flm.http import client as engine_http
    from flm.http.connection import Connection

    class Upstream:
        """The engine side: answers each request on the next loop turns, as a socket would."""

        def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
            self.conn, self.loop, self.closing = conn, loop, False

        def write(self, data: bytes) -> None:
            marks.t["engine_write"] = now()
            marks.segment = "engine"
            if data.startswith(b"GET /v1/models"):
                reply = mock_engine.RESP_MODELS
            elif b'"stream":true' in data:
                reply = mock_engine.SSE_WHOLE  # (the bench's mock sends a stream in one write)
            else:
                reply = mock_engine.RESP_CHAT
            self.loop.call_later(0.0002, self.deliver, reply)

        def deliver(self, reply: bytes) -> None:
            marks.t["engine_reply"] = now()
            marks.segment = "B"
            self.conn.data_received(reply)

        def is_closing(self) -> bool:
            return self.closing

        def abort(self) -> None:
            self.closing = True

        close = abort

        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

    async def connect(self: Any, loop: asyncio.AbstractEventLoop, deadline: float) -> Any:
        conn = Connection()
        conn.connection_made(Upstream(conn, loop))  # type: ignore[arg-type]
        return conn

    engine_http.EngineClient._connect = connect  # type: ignore[method-assign]

    class Downstream:
        """The client side: records the reply."""

        def __init__(self) -> None:
            self.out: list[bytes] = []
            self.event: asyncio.Event | None = None
            self.stream = False

        def write(self, data: bytes) -> None:
            marks.t["client_write"] = now()
            marks.segment = "after"
            self.out.append(data)
            # (a stream's reply is done at its last chunk)
            if self.event is not None and (not self.stream or data.endswith(b"0\r\n\r\n")):
                self.event.set()

        def is_closing(self) -> bool:
            return False

        def get_extra_info(self, name: str) -> Any:
            return ("127.0.0.1", 18200) if name == "sockname" else ("127.0.0.1", 40000)

        def close(self) -> None: ...

        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

    return Upstream, Downstream


async def _measure(
    key: str,
    requests: int,
    bytecodes: bool,
    body: bytes = BODY,
    state_backend: str | None = None,
    rows_shown: int = 20,
) -> None:
    from flm.core.paths import Paths
    from flm.http import server
    from flm.proxy.app import build_app, response_headers
    from flm.proxy.runtime import ProxySettings, build_runtime
    from flm.services.context import Context

    marks = _Marks()
    _, downstream_cls = _fake_transports(marks)
    ctx = Context(Paths.resolve())
    shared = None
    if state_backend:
        from flm.proxy.shared import start_shared
        from flm.state.config import StateBackendConfig

        config = StateBackendConfig.from_options(state_backend, None, False)
        assert config is not None
        shared = await start_shared(ctx, config, "bench")
    runtime = build_runtime(ProxySettings(port=18200, bind="127.0.0.1"), ctx)
    if shared is not None:
        from flm.proxy.shared import attach_shared

        await attach_shared(shared, runtime)
    state = server._ServerState(build_app(runtime), "http", 30.0, response_headers())
    # (what a serving proxy does once started: start-up objects frozen, the young GC threshold
    # raised; see flm/core/heap.py)
    from flm.core.heap import settle_heap

    settle_heap()
    proto = server.HttpProtocol(state)
    down = downstream_cls()
    down.stream = body == STREAM_BODY
    proto.connection_made(down)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    a: list[float] = []
    b: list[float] = []
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            where = f"{Path(code.co_filename).name}:{code.co_firstlineno} {code.co_name}"
            counts[(marks.segment, where)] += 1
        return tracer

    async def one() -> None:
        down.event = asyncio.Event()
        marks.segment = "A"
        started = now()
        proto.data_received(request)
        await down.event.wait()
        await asyncio.sleep(0.0003)  # the next request comes a little later, as at c=1
        marks.segment = "-"
        a.append(marks.t["engine_write"] - started)
        b.append(marks.t["client_write"] - marks.t["engine_reply"])

    for _ in range(300):  # warm-up: model list, key verification, caches
        await one()
    reply = b"".join(down.out[-3:]) if down.stream else down.out[-1]
    if b"HTTP/1.1 200" not in reply or (down.stream and b"data: [DONE]" not in reply):
        raise SystemExit(f"the gateway did not answer 200: {down.out[-1][:300]!r}")
    a.clear()
    b.clear()
    if bytecodes:
        requests = min(requests, 200)
        sys.settrace(tracer)
    for _ in range(requests):
        await one()
    sys.settrace(None)
    await runtime.close()
    if bytecodes:
        for segment, title in (
            ("A", "A: request in → engine request written"),
            ("B", "B: engine reply in → client reply written"),
            ("after", "after the reply"),
        ):
            rows = sorted(
                ((n / requests, where) for (s, where), n in counts.items() if s == segment),
                reverse=True,
            )
            print(f"{title}: {sum(n for n, _ in rows):,.0f} bytecodes per request")
            for n, where in rows[:rows_shown]:
                print(f"  {n:7.1f}  {where}")
        return
    a.sort()
    b.sort()

    def p50(xs: list[float]) -> float:
        return xs[len(xs) // 2] * 1e6

    where = f", shared state in {state_backend}" if state_backend else ""
    print(f"{requests} requests, every security layer on (policy-all-on.json){where}")
    print(f"A  request in → engine request written   p50 {p50(a):6.1f} µs")
    print(f"B  engine reply in → client reply written p50 {p50(b):6.1f} µs")
    print(f"A + B (FLM's own time on the critical path)  {p50(a) + p50(b):6.1f} µs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument(
        "--bytecodes", action="store_true", help="count bytecodes per function instead of timing"
    )
    ap.add_argument(
        "--rows", type=int, default=20, help="with --bytecodes: functions shown per segment"
    )
    ap.add_argument(
        "--scoped",
        action="store_true",
        help="use a key with a model scope, rpm/tpm limits, budgets and an expiry",
    )
    ap.add_argument(
        "--pool", action="store_true", help="send the requests to a pool of two engines"
    )
    ap.add_argument(
        "--stream",
        action="store_true",
        help="streamed requests (the engine sends its 20 chunks in one write, as the "
        "bench's mock does); B then ends at the stream's last chunk",
    )
    ap.add_argument(
        "--state-backend",
        metavar="URL",
        help="keep the shared state in this Redis (redis://HOST:PORT/DB), or 'spawn' a "
        "private redis-server for the run",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flm-hotpath-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir(mode=0o700)
        os.environ["FLM_HOME"] = str(home)
        key = _prepare_home(home, args.scoped, args.pool)
        redis = None
        url = args.state_backend
        if url == "spawn":
            redis, url = _spawn_redis(Path(tmp))
        import uvloop

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(
                    _measure(
                        key,
                        args.requests,
                        args.bytecodes,
                        STREAM_BODY if args.stream else POOL_BODY if args.pool else BODY,
                        url,
                        args.rows,
                    )
                )
        finally:
            if redis is not None:
                redis.terminate()
                redis.wait(timeout=10)


def _spawn_redis(where: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server (Debian package redis-server) on a free loopback port, no
    persistence."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(where),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


if __name__ == "__main__":
    main()
