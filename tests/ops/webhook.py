"""A webhook receiver on loopback that records what it is sent."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(self, status: int = 204, hold_s: float = 0.0) -> None:
        self.status = status
        self.hold_s = hold_s
        self.posts: list[tuple[float, str, Any]] = []
        self.attempts = 0
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                receiver.attempts += 1
                if receiver.hold_s:
                    receiver.release.wait(receiver.hold_s)
                if 200 <= receiver.status < 300:
                    receiver.posts.append((time.monotonic(), self.path, json.loads(body)))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_posts(self, n: int, timeout: float = 10.0) -> list[tuple[float, str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.posts) < n:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {n} POSTs within {timeout} s, got {len(self.posts)}"
                )
            time.sleep(0.01)
        return list(self.posts)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
