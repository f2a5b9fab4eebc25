"""Scoped API keys over real sockets: models, expiry, budgets, per-key limits, usage rollups."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest

from flm.core.paths import Paths
from flm.http.asgi import HEADER_LINES
from flm.proxy.app import build_app
from flm.storage import Storage
from flm.testing.emulators import start_emulator
from flm.testing.gateway import Gateway, start_gateway
from tests.conftest import flm_subprocess
from tests.support import free_port


def _request(
    url: str, method: str, path: str, key: str, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Authorization": f"Bearer {key}"}
    raw = None
    if body is not None:
        raw = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=raw, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _code(raw: bytes) -> str:
    return str(json.loads(raw)["error"]["code"])


@pytest.fixture
def two_engines(cli: Any) -> Iterator[tuple[Any, Any]]:
    with (
        start_emulator("vllm", models=["a1", "a2"]) as a,
        start_emulator("vllm", models=["b1"]) as b,
    ):
        assert cli("engines", "add", "--kind", "vllm", "--url", a.url, "--id", "emu-a").code == 0
        assert cli("engines", "add", "--kind", "vllm", "--url", b.url, "--id", "emu-b").code == 0
        yield a, b


def test_key_scoped_to_one_engine_openai_client(cli: Any, two_engines: Any) -> None:
    created = cli("api-keys", "create", "--label", "friend", "--models", "flm://emu-a/*")
    assert created.code == 0, created.out
    assert created.data["models"] == ["flm://emu-a/*"]
    key = created.data["key"]
    with (
        start_gateway() as gw,
        openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client,
    ):
        reply = client.chat.completions.create(
            model="flm://emu-a/a1", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.chat.completions.create(
                model="flm://emu-b/b1", messages=[{"role": "user", "content": "hi"}]
            )
        assert err.value.status_code == 403
        assert isinstance(err.value.body, dict) and err.value.body["code"] == "model_not_allowed"
        with pytest.raises(openai.PermissionDeniedError):
            client.embeddings.create(model="flm://emu-b/b1", input="x")
        listed = sorted(m.id for m in client.models.list())
        # the engine's ids and the plain names standing for them; nothing of emu-b
        assert listed == ["a1", "a2", "flm://emu-a/a1", "flm://emu-a/a2"]
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("flm://emu-b/b1")
        # the native pass-through honours the scope by engine
        status, _, body = _request(gw.url, "GET", "/engine/emu-b/v1/models", key)
        assert status == 403 and _code(body) == "model_not_allowed"
        assert _request(gw.url, "GET", "/engine/emu-a/v1/models", key)[0] == 200

    # a key limited to one model reaches that model only, and no engine directly
    narrow = cli("api-keys", "create", "--label", "one", "--models", "flm://emu-a/a2").data
    with start_gateway() as gw:
        ok = _request(
            gw.url,
            "POST",
            "/v1/chat/completions",
            narrow["key"],
            {"model": "flm://emu-a/a2", "messages": [{"role": "user", "content": "x"}]},
        )
        assert ok[0] == 200
        refused = _request(
            gw.url,
            "POST",
            "/v1/chat/completions",
            narrow["key"],
            {"model": "flm://emu-a/a1", "messages": [{"role": "user", "content": "x"}]},
        )
        assert refused[0] == 403 and _code(refused[2]) == "model_not_allowed"
        assert _request(gw.url, "GET", "/engine/emu-a/v1/models", narrow["key"])[0] == 403


def test_read_only_key_lists_models_only(cli: Any, two_engines: Any) -> None:
    with start_gateway() as gw:
        # created while the proxy runs (and not told): its scope is read at its first use
        key = cli("api-keys", "create", "--label", "ro", "--read-only").data["key"]
        status, _, body = _request(gw.url, "GET", "/v1/models", key)
        ids = [m["id"] for m in json.loads(body)["data"]]
        assert status == 200 and len([i for i in ids if i.startswith("flm://")]) == 3
        status, _, body = _request(
            gw.url,
            "POST",
            "/v1/chat/completions",
            key,
            {"model": "flm://emu-a/a1", "messages": [{"role": "user", "content": "x"}]},
        )
        assert status == 403 and _code(body) == "read_only_key"
        assert _request(gw.url, "GET", "/engine/emu-a/v1/models", key)[0] == 403


def test_listing_models_does_not_use_the_daily_request_budget(cli: Any, two_engines: Any) -> None:
    """A key's daily request budget counts the requests that reach a model: listing the
    models (``/v1/models``, ``/v1/models/{id}``) and scraping ``/metrics`` cost nothing."""
    with start_gateway() as gw:
        key = cli("api-keys", "create", "--label", "two", "--daily-requests", "2").data["key"]
        for _ in range(3):
            assert _request(gw.url, "GET", "/v1/models", key)[0] == 200
            assert _request(gw.url, "GET", "/v1/models/flm://emu-a/a1", key)[0] == 200
            _request(gw.url, "GET", "/metrics", key)
        chat = {"model": "flm://emu-a/a1", "messages": [{"role": "user", "content": "x"}]}
        for _ in range(2):
            assert _request(gw.url, "POST", "/v1/chat/completions", key, chat)[0] == 200
        status, headers, body = _request(gw.url, "POST", "/v1/chat/completions", key, chat)
        assert status == 429 and _code(body) == "budget_exceeded"
        assert int(headers["retry-after"]) >= 1
        assert _request(gw.url, "GET", "/v1/models", key)[0] == 200  # (still listed)


@pytest.mark.parametrize("lines", [True, False], ids=["ready-lines", "header-pairs"])
def test_per_key_rpm_answers_429_with_openai_rate_headers(
    cli: Any, two_engines: Any, lines: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rate headers reach the client whether the server takes ready-made header lines
    (FLM's own) or only ``(name, value)`` pairs (any other ASGI server)."""
    if not lines:
        import flm.testing.gateway as gateway

        def pairs_only(runtime: Any) -> Any:
            app = build_app(runtime)

            async def without_lines(scope: Any, receive: Any, send: Any) -> None:
                scope.pop(HEADER_LINES, None)

                async def checked(message: Any) -> None:
                    assert HEADER_LINES not in message
                    await send(message)

                await app(scope, receive, checked)

            return without_lines

        monkeypatch.setattr(gateway, "build_app", pairs_only)
    key = cli("api-keys", "create", "--label", "slow", "--rpm", "2", "--tpm", "100000").data["key"]
    body = {"model": "flm://emu-a/a1", "messages": [{"role": "user", "content": "x"}]}
    with start_gateway() as gw:
        first = _request(gw.url, "POST", "/v1/chat/completions", key, body)
        assert first[0] == 200 and first[1]["x-request-id"]
        assert first[1]["x-ratelimit-limit-requests"] == "2"
        assert first[1]["x-ratelimit-remaining-requests"] == "1"
        assert first[1]["x-ratelimit-limit-tokens"] == "100000"
        assert "x-ratelimit-reset-requests" in first[1]
        assert "x-ratelimit-remaining-tokens" in first[1]
        assert _request(gw.url, "POST", "/v1/chat/completions", key, body)[0] == 200
        status, headers, raw = _request(gw.url, "POST", "/v1/chat/completions", key, body)
        assert status == 429 and _code(raw) == "rate_limited"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert int(headers["retry-after"]) >= 1
        assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_expiry_and_update_apply_at_once_in_the_daemon(flm_home: Path) -> None:
    port = free_port()
    with start_emulator("vllm", models=["m"]) as emu:
        flm_subprocess("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        created = json.loads(
            flm_subprocess("api-keys", "create", "--label", "old", "--expires", "2020-01-01").stdout
        )["data"]
        assert created["status"] == "expired"
        assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
        url = f"http://127.0.0.1:{port}"
        try:
            status, headers, body = _request(url, "GET", "/v1/models", created["key"])
            assert status == 401 and _code(body) == "key_expired"
            assert "www-authenticate" in headers
            updated = flm_subprocess("api-keys", "update", created["id"], "--expires", "30d")
            assert updated.returncode == 0, updated.stdout
            assert _request(url, "GET", "/v1/models", created["key"])[0] == 200  # no wait
            flm_subprocess("api-keys", "update", created["id"], "--expires", "2021-06-01T00:00:00Z")
            status, _, body = _request(url, "GET", "/v1/models", created["key"])
            assert status == 401 and _code(body) == "key_expired"
        finally:
            flm_subprocess("proxy", "stop", "--all")


def test_daily_token_budget_holds_across_a_daemon_restart(flm_home: Path) -> None:
    port = free_port()
    body = {
        "model": "flm://v/m",
        "messages": [{"role": "user", "content": "tell me about budgets please"}],
    }
    with start_emulator("vllm", models=["m"]) as emu:
        flm_subprocess("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        created = json.loads(
            flm_subprocess(
                "api-keys", "create", "--label", "budget", "--daily-tokens", "100"
            ).stdout
        )["data"]
        key = created["key"]
        assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
        url = f"http://127.0.0.1:{port}"
        used = 0
        try:
            for _ in range(100):
                status, headers, raw = _request(url, "POST", "/v1/chat/completions", key, body)
                if status != 200:
                    break
                assert used < 100  # served only while the reported usage stays under 100
                used += int(json.loads(raw)["usage"]["total_tokens"])
            else:
                pytest.fail("the budget never ran out")
            assert used >= 100
            assert status == 429 and _code(raw) == "budget_exceeded"
            retry = int(headers["retry-after"])
            assert 0 < retry <= 86_400
            assert abs(retry - (86_400 - time.time() % 86_400)) < 120
        finally:
            flm_subprocess("proxy", "stop", "--all")
        # a new daemon loads today's totals: still refused
        assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
        try:
            status, headers, raw = _request(url, "POST", "/v1/chat/completions", key, body)
            assert status == 429 and _code(raw) == "budget_exceeded"
            assert "retry-after" in headers
            listed = json.loads(flm_subprocess("api-keys", "list").stdout)["data"]
            assert listed[0]["today"]["tokens"] == used
            assert listed[0]["last_used_at"] is not None
            # lifting the budget serves the key again at once
            flm_subprocess("api-keys", "update", created["id"], "--daily-tokens", "0")
            assert _request(url, "POST", "/v1/chat/completions", key, body)[0] == 200
        finally:
            flm_subprocess("proxy", "stop", "--all")


def _rollup_totals(home: Path, key_id: str) -> tuple[int, int, int, int]:
    storage = Storage(Paths.resolve())
    try:
        row = storage.security.query_one(
            "SELECT SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), "
            "SUM(estimated) FROM usage_minute WHERE key_id=?",
            (key_id,),
        )
        assert row is not None
        return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0), int(row[3] or 0)
    finally:
        storage.close()


async def _mixed_requests(gw: Gateway, key: str, total: int) -> tuple[int, int, int]:
    """``total`` chat requests, plain and streamed (with and without include_usage); the sums
    of the usage the emulator reported, and how many streams saw no usage chunk."""
    prompts = [f"question {i} " + "word " * i for i in range(10)]
    known: dict[str, tuple[int, int]] = {}  # prompt -> the emulator's usage (deterministic)
    prompt_sum = completion_sum = 0
    unreported: list[str] = []
    hidden_streams = 0
    sem = asyncio.Semaphore(16)
    headers = {"Authorization": f"Bearer {key}"}

    async with aiohttp.ClientSession(
        base_url=gw.url, headers=headers, timeout=aiohttp.ClientTimeout(total=60)
    ) as client:

        async def one(i: int) -> None:
            nonlocal prompt_sum, completion_sum, hidden_streams
            text = prompts[i % len(prompts)]
            body: dict[str, Any] = {
                "model": "flm://emu-a/a1",
                "messages": [{"role": "user", "content": text}],
            }
            kind = "plain" if i < len(prompts) else ("plain", "usage", "hidden")[i % 3]
            async with sem:
                if kind == "plain":
                    async with client.post("/v1/chat/completions", json=body) as resp:
                        assert resp.status == 200
                        usage = (await resp.json())["usage"]
                    known[text] = (usage["prompt_tokens"], usage["completion_tokens"])
                    prompt_sum += usage["prompt_tokens"]
                    completion_sum += usage["completion_tokens"]
                    return
                body["stream"] = True
                if kind == "usage":
                    body["stream_options"] = {"include_usage": True}
                async with client.post("/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    raw = await resp.read()
            events = [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
            chunks = [json.loads(e) for e in events]
            assert raw.rstrip().endswith(b"data: [DONE]")
            with_usage = [c for c in chunks if c.get("usage")]
            if kind == "usage":
                assert len(with_usage) == 1 and with_usage[0]["choices"] == []
                usage = with_usage[0]["usage"]
                prompt_sum += usage["prompt_tokens"]
                completion_sum += usage["completion_tokens"]
            else:
                # FLM asked the engine for usage; this client did not and never sees it
                assert with_usage == [] and b'"usage"' not in raw
                assert all(c["choices"] for c in chunks)
                hidden_streams += 1
                unreported.append(text)

        await asyncio.gather(*(one(i) for i in range(len(prompts))))  # learn each prompt's usage
        await asyncio.gather(*(one(i) for i in range(len(prompts), total)))
    for text in unreported:
        prompt_sum += known[text][0]
        completion_sum += known[text][1]
    return prompt_sum, completion_sum, hidden_streams


def test_rollups_equal_the_engines_usage_over_1000_mixed_requests(
    flm_home: Path, cli: Any, two_engines: Any
) -> None:
    created = cli("api-keys", "create", "--label", "counted").data
    with start_gateway() as gw:
        prompt_sum, completion_sum, hidden = asyncio.run(_mixed_requests(gw, created["key"], 1000))
        assert hidden > 300
        gw.call(lambda: gw.runtime.usage.flush())  # (the flusher's work, now)
        metrics = _request(gw.url, "GET", "/metrics", created["key"])[2].decode()
    requests, prompt, completion, estimated = _rollup_totals(flm_home, created["id"])
    assert (requests, prompt, completion, estimated) == (1000, prompt_sum, completion_sum, 0)
    assert (
        f'flm_key_tokens_total{{direction="out",key="counted",model="flm://emu-a/a1"}} '
        f"{float(completion_sum)}"
    ) in metrics
    report = cli("usage", "--key", created["id"], "--by", "model")
    assert report.code == 0
    assert report.data["rows"] == [
        {
            "model": "flm://emu-a/a1",
            "requests": 1000,
            "prompt_tokens": prompt_sum,
            "completion_tokens": completion_sum,
            "total_tokens": prompt_sum + completion_sum,
            "estimated_requests": 0,
        }
    ]
    csv_out = cli("usage", "--by", "engine", "--format", "csv")
    assert csv_out.code == 0
    assert csv_out.out.splitlines()[:2] == [
        "engine,requests,prompt_tokens,completion_tokens,total_tokens,estimated_requests",
        f"emu-a,1000,{prompt_sum},{completion_sum},{prompt_sum + completion_sum},0",
    ]
