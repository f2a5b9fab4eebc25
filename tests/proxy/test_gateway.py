"""The gateway over real sockets: the openai client, streaming, disconnects, failures, errors."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from flm.testing.emulators import ModelSpec, expected_reply
from tests.conftest import audit_rows
from tests.proxy.conftest import Stack


def _request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_openai_client_models_chat_stream_embeddings(stack: Stack) -> None:
    with openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, max_retries=0) as client:
        ids = {m.id for m in client.models.list()}
        assert stack.model("chat-model:1b") in ids and stack.model("nomic-embed-text:v1") in ids
        reply = client.chat.completions.create(
            model=stack.model("chat-model:1b"),
            messages=[{"role": "user", "content": "hello there"}],
        )
        assert reply.choices[0].message.content == expected_reply("hello there")
        assert reply.model == stack.model("chat-model:1b")
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        text = ""
        models = set()
        for chunk in client.chat.completions.create(
            model=stack.model("chat-model:1b"),
            stream=True,
            messages=[{"role": "user", "content": "stream me"}],
        ):
            models.add(chunk.model)
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        assert text == expected_reply("stream me")
        assert models == {stack.model("chat-model:1b")}
        emb = client.embeddings.create(model=stack.model("nomic-embed-text:v1"), input=["a b", "c"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 32
        assert emb.model == stack.model("nomic-embed-text:v1")
        resp = client.responses.create(model=stack.model("chat-model:1b"), input="respond")
        assert resp.output_text == expected_reply("respond")
        deltas, kinds = [], []
        final = None
        for event in client.responses.create(
            model=stack.model("chat-model:1b"), input="respond in pieces", stream=True
        ):
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.completed":
                final = event.response
        assert "".join(deltas) == expected_reply("respond in pieces")
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert final is not None and final.output_text == expected_reply("respond in pieces")
        assert final.usage is not None and final.usage.output_tokens > 0


def _stream_events(
    url: str, headers: dict[str, str], body: dict[str, Any], on_event: Any = None
) -> list[tuple[float, bytes]]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    events: list[tuple[float, bytes]] = []
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body).encode(),
            headers={**headers, "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("x-accel-buffering") == "no"
        buf = b""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                events.append((time.monotonic(), event))
                if on_event is not None and on_event(event, conn) is False:
                    return events
    finally:
        conn.close()
    return events


def test_stream_arrives_chunk_by_chunk(vllm_stack: Stack) -> None:
    vllm_stack.emu.behaviour.chunk_interval_s = 0.2
    vllm_stack.emu.behaviour.stream_chunks = 5
    events = _stream_events(
        vllm_stack.url,
        vllm_stack.auth,
        {
            "model": vllm_stack.model("chat-model:1b"),
            "stream": True,
            "messages": [{"role": "user", "content": "slowly please"}],
        },
    )
    assert events[-1][1] == b"data: [DONE]"
    content_times = [t for t, e in events if b'"content"' in e and b'"content":""' not in e]
    assert len(content_times) >= 5
    gaps = [b - a for a, b in itertools.pairwise(content_times)]
    assert all(g > 0.12 for g in gaps), gaps  # each chunk forwarded when it came, not buffered


def test_client_disconnect_closes_engine_connection(vllm_stack: Stack) -> None:
    emu = vllm_stack.emu
    emu.behaviour.endless = True
    emu.behaviour.chunk_interval_s = 0.05
    closed_at: list[float] = []

    def hang_up(event: bytes, conn: http.client.HTTPConnection) -> bool:
        if b'"content"' in event:
            assert conn.sock is not None
            conn.sock.shutdown(socket.SHUT_RDWR)
            closed_at.append(time.monotonic())
            return False
        return True

    _stream_events(
        vllm_stack.url,
        vllm_stack.auth,
        {
            "model": vllm_stack.model("chat-model:1b"),
            "stream": True,
            "messages": [{"role": "user", "content": "never stop"}],
        },
        on_event=hang_up,
    )
    emu.wait_for(lambda: len(emu.disconnects) >= 1, timeout=5)
    assert emu.disconnects[0] - closed_at[0] < 1.0


@pytest.mark.parametrize("route", ["chat", "passthrough"])
def test_client_leaving_a_non_streamed_request_cancels_it_upstream(
    vllm_stack: Stack, flm_home: Path, route: str
) -> None:
    """Not only streams: a client that goes away while the engine works on a plain request
    drops the engine connection at once (it used to run to its end, up to 60 s)."""
    emu = vllm_stack.emu
    path, body = {
        "chat": (
            "/v1/chat/completions",
            {
                "model": vllm_stack.model("chat-model:1b"),
                "messages": [{"role": "user", "content": "hi"}],
            },
        ),
        "passthrough": ("/engine/eng/v1/completions", {"model": "chat-model:1b", "prompt": "hi"}),
    }[route]
    host, port = vllm_stack.url.rsplit("/", 1)[1].split(":")
    data = json.dumps(body).encode()
    warm = http.client.HTTPConnection(host, int(port), timeout=10)  # (models listed, cached)
    warm.request(
        "POST", path, body=data, headers={**vllm_stack.auth, "Content-Type": "application/json"}
    )
    assert warm.getresponse().status == 200
    warm.close()
    emu.requests.clear()
    emu.behaviour.delay_s = 30  # now the engine takes its time before answering
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {vllm_stack.key}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        emu.wait_for(
            lambda: any(p == path.removeprefix("/engine/eng") for _, p in emu.requests), timeout=10
        )
        sock.shutdown(socket.SHUT_RDWR)
        closed_at = time.monotonic()
    emu.wait_for(lambda: len(emu.disconnects) >= 1, timeout=10)
    assert emu.disconnects[0] - closed_at < 1.0
    rows = audit_rows(
        flm_home,
        "SELECT status, error_type FROM audit_logs WHERE event_type = 'request'",
        flush=vllm_stack.gateway.runtime.audit.flush,
    )  # type: ignore[union-attr]
    assert (499, "client_disconnected") in [tuple(r) for r in rows]


@pytest.mark.parametrize("failure", ["drop", "hang"])
def test_engine_failure_mid_stream_gives_error_event_and_done(
    vllm_stack: Stack, cli: Any, failure: str
) -> None:
    emu = vllm_stack.emu
    emu.behaviour.chunk_interval_s = 0.05
    if failure == "drop":
        emu.behaviour.drop_after_chunks = 2
    else:
        emu.behaviour.hang_after_chunks = 2
        vllm_stack.gateway.runtime.engines.adapter("eng").client.timeouts = type(
            vllm_stack.gateway.runtime.engines.adapter("eng").client.timeouts
        )(idle_s=0.5)
    events = _stream_events(
        vllm_stack.url,
        vllm_stack.auth,
        {
            "model": vllm_stack.model("chat-model:1b"),
            "stream": True,
            "messages": [{"role": "user", "content": "break please"}],
        },
    )
    last_content = max(t for t, e in events if b'"content"' in e)
    error_events = [(t, e) for t, e in events if e.startswith(b'data: {"error"')]
    assert len(error_events) == 1
    assert events[-1][1] == b"data: [DONE]"
    body = json.loads(error_events[0][1][6:])
    assert body["error"]["request_id"] and body["error"]["type"] == "engine_error"
    # idle timeout 0.5 s for the hang; the drop is seen at once: both well within 1 s
    assert events[-1][0] - last_content < 1.0


def test_error_contract(stack: Stack) -> None:
    def post(
        path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        status, hdrs, raw = _request(
            stack.url,
            "POST",
            path,
            json.dumps(body).encode(),
            {**stack.auth, "Content-Type": "application/json", **(headers or {})},
        )
        assert hdrs.get("x-request-id"), (status, raw)
        return status, hdrs, json.loads(raw) if raw else None

    msgs = [{"role": "user", "content": "x"}]
    status, _, body = post("/v1/chat/completions", {"model": "", "messages": msgs})
    assert status == 400 and body["error"]["code"] == "invalid_model"
    assert body["error"]["request_id"] and body["error"]["type"] == "invalid_request_error"
    status, _, body = post("/v1/chat/completions", {"model": stack.model("nope"), "messages": msgs})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, _, body = post("/v1/chat/completions", {"model": "flm://ghost/x", "messages": msgs})
    assert status == 404
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    }
    status, _, body = post(
        "/v1/chat/completions", {"model": stack.model("chat-model:1b"), "messages": [image]}
    )
    if stack.emu.kind == "vllm":  # the others accept images on vision models only
        assert status == 422 and body["error"]["code"] == "unsupported_modalities"
    status, _, body = post(
        "/v1/chat/completions",
        {
            "model": stack.model("chat-model:1b"),
            "messages": msgs,
            "response_format": {"type": "xml"},
        },
    )
    assert status == 400 and body["error"]["code"] == "unsupported_parameter"

    def chats_seen() -> int:
        return sum(1 for _m, p in stack.emu.requests if p in ("/v1/chat/completions", "/api/chat"))

    assert chats_seen() == 0  # every refusal above was answered without the engine
    status, hdrs, body = post(
        "/v1/chat/completions",
        {"model": stack.model("chat-model:1b"), "messages": msgs, "temperature": 7},
    )
    assert status == 200 and "temperature clamped" in hdrs["x-flm-warning"]
    assert chats_seen() == 1
    status, _, body = post("/v1/images/generations", {"prompt": "cat"})
    assert status == 501 and body["error"]["code"] == "not_implemented"
    status, _, body = post("/v1/audio/speech", {"input": "hi"})
    assert status == 404 and body["error"]["code"] == "route_disabled"
    status, hdrs, _ = _request(stack.url, "GET", "/health")
    assert status == 200 and hdrs["x-request-id"]
    status, hdrs, _raw = _request(stack.url, "GET", "/nope", headers=stack.auth)
    assert status == 404 and hdrs["x-request-id"]


@pytest.mark.parametrize("kind", ["ollama", "lmstudio"])
def test_vision_model_accepts_image_where_engine_can(cli: Any, kind: str) -> None:
    from tests.proxy.conftest import make_stack

    gen = make_stack(cli, kind, ["chat-model:1b", ModelSpec("see:v1", vision=True)])
    stack = next(gen)
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "see"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    }
    status, _, raw = _request(
        stack.url,
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": stack.model("see:v1"), "messages": [image]}).encode(),
        {**stack.auth, "Content-Type": "application/json"},
    )
    assert status == 200, raw
    assert "[images: 1]" in json.loads(raw)["choices"][0]["message"]["content"]
    status, _, raw = _request(
        stack.url,
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": stack.model("chat-model:1b"), "messages": [image]}).encode(),
        {**stack.auth, "Content-Type": "application/json"},
    )
    assert status == 422 and json.loads(raw)["error"]["code"] == "unsupported_modalities"
    gen.close()


def test_large_plain_reply_arrives_whole(stack: Stack) -> None:
    """A non-streamed reply bigger than the engine connection's read buffer (256 KiB) is
    drained and delivered at once, not left waiting for the first-byte timeout."""
    stack.emu.behaviour.reply_text = "y" * 600_000
    body = json.dumps(
        {"model": stack.model("chat-model:1b"), "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    started = time.monotonic()
    status, _hdrs, raw = _request(
        stack.url,
        "POST",
        "/v1/chat/completions",
        body,
        {**stack.auth, "Content-Type": "application/json"},
    )
    assert status == 200, raw[:300]
    assert json.loads(raw)["choices"][0]["message"]["content"] == "y" * 600_000
    assert time.monotonic() - started < 5


def test_40mb_body_refused_without_reading_it(vllm_stack: Stack) -> None:
    parts = urlsplit(vllm_stack.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    try:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {vllm_stack.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {40 * 1024 * 1024}\r\n\r\n"
        ).encode()
        sock.sendall(head + b"{" * 1024)  # only 1 KB of the promised 40 MB is ever sent
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
            part = sock.recv(65536)  # headers and body may come in separate segments
            if not part:
                break
            reply += part
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"payload_too_large" in reply and b"x-request-id" in reply.lower()


def test_chunked_body_over_limit_is_cut(vllm_stack: Stack, flm_home: Path) -> None:
    """A chunked body past the limit gets its 413 while the client is still sending. The
    client reads concurrently with sending (the kernel buffers on loopback can hold tens of MB,
    so how much it manages to send before the answer says nothing), stops at the answer, and
    must see the refusal: the server half-closes after it and discards a bounded amount of
    what still comes before it closes, so a reset cannot destroy the 413 unread."""
    import threading

    limit = vllm_stack.gateway.runtime.settings.max_body_bytes
    parts = urlsplit(vllm_stack.url)
    chunk = b" " * (1024 * 1024)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    reply = bytearray()
    read_error: list[OSError] = []
    answered = threading.Event()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:

        def read() -> None:
            try:
                while part := sock.recv(65536):
                    reply.extend(part)
            except OSError as exc:
                read_error.append(exc)
            finally:
                answered.set()

        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + vllm_stack.key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sent = 0
        # (the server must answer long before twice the limit has been sent)
        while not answered.is_set() and sent < 2 * limit:
            try:
                sock.sendall(framed)
            except OSError:
                break  # the server closed after its answer: the reader has it
            sent += len(chunk)
        assert sent < 2 * limit, f"{sent} bytes sent and no answer: the body limit did not apply"
        reader.join(timeout=30)
        assert not reader.is_alive(), "no answer and no close 30 s after sending stopped"
    assert reply.startswith(b"HTTP/1.1 413"), (bytes(reply[:200]), read_error)
    assert b"payload_too_large" in reply
    rows = audit_rows(
        flm_home,
        "SELECT status, error_type FROM audit_logs WHERE event_type = 'request'",
        flush=vllm_stack.gateway.runtime.audit.flush,
    )  # type: ignore[union-attr]
    assert [tuple(r) for r in rows] == [(413, "payload_too_large")]
    assert all(path != "/v1/chat/completions" for _m, path in vllm_stack.emu.requests)


def test_auth_and_passthrough(cli: Any, stack: Stack) -> None:
    emu = stack.emu
    before = len(emu.requests)
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": stack.key},
        {"Authorization": f"Basic {stack.key}"},
    ):
        status, _hdrs, raw = _request(stack.url, "GET", "/v1/models", headers=headers)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    status, _, _ = _request(stack.url, "GET", f"/v1/models?api_key={stack.key}")
    assert status == 401
    assert len(emu.requests) == before

    native = {"ollama": "/api/tags", "vllm": "/v1/models", "lmstudio": "/api/v0/models"}
    status, _, raw = _request(
        stack.url, "GET", f"/engine/eng{native[emu.kind]}", headers=stack.auth
    )
    assert status == 200 and json.loads(raw)
    if emu.kind == "ollama":
        for path in (
            "/api/pull",
            "/api/delete",
            "/api/create",
            "/api/push",
            "/api/copy",
            "/api/blobs/sha256:abc",
            "/API/PULL",
        ):
            status, _, _ = _request(stack.url, "POST", f"/engine/eng{path}", b"{}", stack.auth)
            assert status == 403, path
        assert not any(
            p.startswith(
                ("/api/pull", "/api/delete", "/api/create", "/api/push", "/api/copy", "/api/blobs")
            )
            for _m, p in emu.requests
        )
    for path in (
        "/engine/eng/%2e%2e/etc/passwd",
        "/engine/eng//api/tags",
        "/engine/eng/api/../api/pull",
        "/engine/eng/api%2fpull",
        "/engine/nope/api/tags",
    ):
        status, _, _ = _request(stack.url, "GET", path, headers=stack.auth)
        assert status == 404, path

    key_id = stack.key.split("_")[1]
    assert cli("api-keys", "revoke", key_id).code == 0
    active = {k["id"] for k in cli("api-keys", "list").data if k["status"] == "active"}
    stack.gateway.call(lambda: stack.gateway.runtime.keys.retain_only(active))
    status, _, _ = _request(stack.url, "GET", "/v1/models", headers=stack.auth)
    assert status == 401


def test_metrics_on_loopback(vllm_stack: Stack) -> None:
    _request(vllm_stack.url, "GET", "/v1/models", headers=vllm_stack.auth)
    body = {
        "model": vllm_stack.model("chat-model:1b"),
        "messages": [{"role": "user", "content": "one two three"}],
        "stream_options": {"include_usage": True},
    }
    _request(
        vllm_stack.url,
        "POST",
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {**vllm_stack.auth, "Content-Type": "application/json"},
    )
    _stream_events(vllm_stack.url, vllm_stack.auth, {**body, "stream": True})
    status, hdrs, raw = _request(vllm_stack.url, "GET", "/metrics")
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    text = raw.decode()
    assert 'flm_requests_total{engine="",route="/v1/models",status="200"}' in text
    assert "flm_request_duration_seconds_bucket" in text and "flm_active_streams" in text
    assert 'flm_time_to_first_token_seconds_count{engine="eng"} 1.0' in text
    out_tokens = [
        line
        for line in text.splitlines()
        if line.startswith('flm_tokens_total{direction="out",engine="eng"}')
    ]
    assert out_tokens and float(out_tokens[0].split()[-1]) >= 2 * len(["one", "two", "three"])
    assert 'flm_overhead_seconds_count{route="/v1/chat/completions"}' in text


def test_streamed_responses_fail_as_http_errors_before_the_first_event(vllm_stack: Stack) -> None:
    """An engine that fails at once gives a streamed Responses request the same HTTP error
    a chat completion gets, not a 200 whose stream then reports the failure."""
    parts = urlsplit(vllm_stack.url)

    def post(path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request(
                "POST",
                path,
                json.dumps(body),
                {**vllm_stack.auth, "Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    body = {"model": vllm_stack.model("chat-model:1b"), "input": "hi", "stream": True}
    status, raw = post("/v1/responses", body)
    kinds = [line[7:] for line in raw.decode().splitlines() if line.startswith("event: ")]
    assert status == 200 and kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    vllm_stack.emu.behaviour.status_override = 500
    chat_status, chat_raw = post(
        "/v1/chat/completions",
        {"model": body["model"], "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    )
    status, raw = post("/v1/responses", body)
    assert status == chat_status >= 500
    assert json.loads(raw)["error"]["code"] == json.loads(chat_raw)["error"]["code"]
