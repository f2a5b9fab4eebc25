"""``/engine/{id}/{path}``: which hosts, routes, methods and headers cross the gateway."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from flm.testing.emulators import start_emulator
from flm.testing.gateway import Gateway, start_gateway
from tests.conftest import audit_rows


class _Peer(BaseHTTPRequestHandler):
    """A small HTTP server standing behind the gateway: records what reaches it and answers
    with whatever headers the test asks for. As an engine it serves an OpenAI model list."""

    seen: list[tuple[str, str, dict[str, str]]]
    reply_headers: list[tuple[str, str]]
    engine_like: bool

    def _answer(self) -> None:
        self.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.engine_like and self.path == "/v1/models":
            body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
            headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        elif self.path == "/secret.txt":
            body, headers = "INTERNAL-ONLY", [("Content-Type", "text/plain")]
        elif self.path == "/echo":
            body, headers = "{}", [("Content-Type", "application/json"), *self.reply_headers]
        else:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_TRACE = do_CONNECT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Peer:
    def __init__(
        self, *, engine_like: bool, reply_headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        handler = type(
            "Handler",
            (_Peer,),
            {"seen": self.seen, "engine_like": engine_like, "reply_headers": reply_headers or []},
        )
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def paths(self) -> list[str]:
        return [path for _m, path, _h in self.seen]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peer_factory() -> Iterator[Any]:
    made: list[Peer] = []

    def make(**kw: Any) -> Peer:
        made.append(Peer(**kw))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


def _request(
    gw: Gateway, method: str, path: str, key: str | None, headers: dict[str, str] | None = None
) -> tuple[int, list[tuple[str, str]], bytes]:
    parts = urlsplit(gw.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, [(k.lower(), v) for k, v in resp.getheaders()], resp.read()
    finally:
        conn.close()


def test_default_endpoint_is_an_engine_only_when_detected(
    cli: Any, monkeypatch: pytest.MonkeyPatch, peer_factory: Any
) -> None:
    """A kind's default endpoint where something that is not that engine listens is not a
    forwarding target; the same endpoint with the engine on it is (SPEC §3.1)."""
    key = cli("api-keys", "create", "--label", "t").data["key"]
    plain = peer_factory(engine_like=False)
    monkeypatch.setenv("VLLM_PORT", str(plain.port))
    with start_gateway() as gw:
        for path in ("/engine/vllm/secret.txt", "/engine/vllm/"):
            status, _, body = _request(gw, "GET", path, key)
            assert status == 404 and b"INTERNAL" not in body, (path, body)
    assert "/secret.txt" not in plain.paths() and "/" not in plain.paths()

    with start_emulator("vllm", models=["m:1"]) as emu:
        monkeypatch.setenv("VLLM_PORT", str(urlsplit(emu.url).port))
        with start_gateway() as gw:
            status, _, body = _request(gw, "GET", "/engine/vllm/v1/models", key)
            assert status == 200 and json.loads(body)["data"][0]["id"] == "m:1"


def test_admin_and_account_routes_are_refused(cli: Any) -> None:
    with (
        start_emulator("ollama", models=["m:1"]) as oll,
        start_emulator("vllm", models=["m:1"]) as vll,
    ):
        cli("engines", "add", "--kind", "ollama", "--url", oll.url, "--id", "oll")
        cli("engines", "add", "--kind", "vllm", "--url", vll.url, "--id", "vll")
        key = cli("api-keys", "create", "--label", "t").data["key"]
        refused = {
            "oll": [
                "/api/pull",
                "/api/signout",
                "/api/me",
                "/api/user/keys/abc",
                "/api/experimental/web_fetch",
                "/api/pull;x=1",
                "/api/blobs/sha256:0",
            ],
            "vll": [
                "/init_weight_transfer_engine",
                "/start_weight_update",
                "/abort_requests",
                "/weight_checker",
                "/update_weight_version",
                "/fault_tolerance/apply",
                "/v1/load_lora_adapter",
                "/sleep",
                "/reset_prefix_cache",
            ],
        }
        with start_gateway() as gw:
            for engine, paths in refused.items():
                for path in paths:
                    status, _, body = _request(gw, "POST", f"/engine/{engine}{path}", key)
                    assert status == 403, (engine, path, body)
            assert _request(gw, "GET", "/engine/oll/api/tags", key)[0] == 200
            assert _request(gw, "GET", "/engine/vll/v1/models", key)[0] == 200
        forwarded = [p for _m, p in oll.requests] + [p for _m, p in vll.requests]
        assert not any(p in forwarded for paths in refused.values() for p in paths)


def test_headers_are_filtered_both_ways(cli: Any, peer_factory: Any, flm_home: Path) -> None:
    engine = peer_factory(
        engine_like=True,
        reply_headers=[
            ("Connection", "x-engine-secret"),
            ("X-Engine-Secret", "s3"),
            ("Proxy-Authenticate", "Basic"),
            ("Upgrade", "h2c"),
            ("Trailer", "x-sum"),
            ("X-Request-Id", "spoofed"),
            ("Strict-Transport-Security", "max-age=0"),
            ("X-Frame-Options", "ALLOWALL"),
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Credentials", "true"),
            ("X-Kept", "yes"),
        ],
    )
    cli("engines", "add", "--kind", "vllm", "--url", engine.url, "--id", "peer")
    key = cli("api-keys", "create", "--label", "t").data["key"]
    with start_gateway() as gw:
        status, headers, _ = _request(
            gw,
            "GET",
            "/engine/peer/echo",
            key,
            {"Connection": "X-Hop", "X-Hop": "1", "Proxy-Connection": "keep-alive", "X-Fine": "1"},
        )
        assert status == 200
        names = [name for name, _v in headers]
        values = dict(headers)
        for gone in (
            "x-engine-secret",
            "proxy-authenticate",
            "upgrade",
            "trailer",
            "strict-transport-security",
            "access-control-allow-origin",
            "access-control-allow-credentials",
        ):
            assert gone not in names, gone
        assert values["x-kept"] == "yes"
        assert names.count("x-request-id") == 1 and values["x-request-id"] != "spoofed"
        assert names.count("x-frame-options") == 1 and values["x-frame-options"] == "DENY"

        sent = next(h for _m, path, h in engine.seen if path == "/echo")
        assert sent.get("x-fine") == "1"
        for gone in ("x-hop", "proxy-connection", "authorization"):
            assert gone not in sent, gone

        # methods that are no engine API's are not forwarded
        before = len(engine.seen)
        assert _request(gw, "TRACE", "/engine/peer/echo", key)[0] == 405
        assert _request(gw, "CONNECT", "/engine/peer/echo", key)[0] in (400, 405)
        assert len(engine.seen) == before

        # the audit row names the engine
        rows = audit_rows(
            flm_home,
            "SELECT engine_id FROM audit_logs WHERE endpoint = "
            "'/engine/peer/echo' AND status = 200",
            flush=gw.runtime.audit.flush,
        )  # type: ignore[union-attr]
        assert rows == [("peer",)]


def test_engine_failures_do_not_reveal_the_engine_address(cli: Any) -> None:
    """Errors that reach API clients name an engine by its id, never by its URL."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with start_emulator("vllm", models=["m:1"]) as emu:
        cli(
            "engines",
            "add",
            "--kind",
            "vllm",
            "--url",
            f"http://127.0.0.1:{dead_port}",
            "--id",
            "down",
        )
        cli("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "slow")
        cli("config", "set", "engine.first_byte_timeout_s", "0.5")
        key = cli("api-keys", "create", "--label", "t").data["key"]
        emu_port = str(urlsplit(emu.url).port)
        with start_gateway() as gw:
            emu.behaviour.delay_s = 2.0
            for engine, port in (("down", str(dead_port)), ("slow", emu_port)):
                for path in (f"/engine/{engine}/v1/models", "/v1/chat/completions"):
                    body = json.dumps(
                        {
                            "model": f"flm://{engine}/m:1",
                            "messages": [{"role": "user", "content": "hi"}],
                        }
                    ).encode()
                    parts = urlsplit(gw.url)
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                    conn.request(
                        "POST" if path.startswith("/v1") else "GET",
                        path,
                        body=body if path.startswith("/v1") else None,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    resp = conn.getresponse()
                    raw = resp.read()
                    conn.close()
                    assert resp.status in (502, 503, 504), (engine, path, raw)
                    message = json.loads(raw)["error"]["message"]
                    assert f"'{engine}'" in message or f" {engine} " in message, message
                    assert port not in message and "127.0.0.1" not in message, message
