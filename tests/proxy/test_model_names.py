"""Plain model names and aliases: what OpenAI clients send instead of ``flm://`` ids."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flm.testing.emulators import start_emulator
from flm.testing.gateway import Gateway, start_gateway
from tests.conftest import flm_subprocess
from tests.support import free_port

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _call(url: str, key: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - loopback only
        url,
        data=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with _OPENER.open(request, timeout=20) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), json.loads(exc.read())


def _chat(base: str, key: str, model: str) -> tuple[int, Any]:
    return _call(
        f"{base}/v1/chat/completions",
        key,
        {"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )


@pytest.fixture
def two_engines(cli: Any) -> Iterator[tuple[Gateway, str]]:
    with (
        start_emulator("ollama", models=["llama3.2:latest", "shared:1b"]) as ol,
        start_emulator("vllm", models=["qwen", "shared:1b", "nomic-embed-text:v1"]) as vl,
    ):
        assert cli("engines", "add", "--kind", "ollama", "--url", ol.url, "--id", "ol").code == 0
        assert cli("engines", "add", "--kind", "vllm", "--url", vl.url, "--id", "vl").code == 0
        key = cli("api-keys", "create", "--label", "t").data["key"]
        with start_gateway() as gw:
            yield gw, key


def test_plain_names_resolve_ambiguous_and_unknown(two_engines: tuple[Gateway, str]) -> None:
    gw, key = two_engines
    status, body = _chat(gw.url, key, "qwen")
    assert status == 200, body
    assert body["model"] == "qwen"  # replies carry the name the client sent
    status, body = _chat(gw.url, key, "llama3.2")  # Ollama's implicit :latest
    assert status == 200, body
    status, body = _chat(gw.url, key, "shared:1b")
    assert status == 400 and body["error"]["code"] == "ambiguous_model"
    assert "flm://ol/shared:1b" in body["error"]["message"]
    assert "flm://vl/shared:1b" in body["error"]["message"]
    status, body = _chat(gw.url, key, "no-such-model")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = _call(
        f"{gw.url}/v1/embeddings", key, {"model": "nomic-embed-text:v1", "input": "x"}
    )
    assert status == 200 and body["model"] == "nomic-embed-text:v1", body
    status, body = _call(f"{gw.url}/v1/models", key)
    ids = [m["id"] for m in body["data"]]
    assert "flm://vl/qwen" in ids and "qwen" in ids and "llama3.2:latest" in ids
    assert "shared:1b" not in ids  # ambiguous names are not offered
    for name in ("qwen", "flm://ol/shared:1b"):
        assert _chat(gw.url, key, name)[0] == 200  # every listed id can be called


def test_alias_cli_validates_and_lists(cli: Any) -> None:
    assert cli("models", "alias", "set", "flm://x/y", "flm://a/b").code != 0
    assert cli("models", "alias", "set", "gpt", "not-an-id").code != 0
    assert cli("models", "alias", "set", "gpt", "flm://a/b").code == 0
    assert cli("models", "alias", "set", "gpt", "flm://a/c").code == 0  # changed in place
    rows = cli("models", "alias", "list").data
    assert [(r["name"], r["target"]) for r in rows] == [("gpt", "flm://a/c")]
    assert cli("models", "alias", "remove", "gpt").code == 0
    assert cli("models", "alias", "list").data == []
    assert cli("models", "alias", "remove", "gpt").error["code"] == "ALIAS_NOT_FOUND"


def test_alias_applies_live_in_running_proxy(flm_home: Path) -> None:
    port = free_port()
    with start_emulator("vllm", models=["qwen"]) as emu:
        flm_subprocess("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        key = json.loads(flm_subprocess("api-keys", "create", "--label", "k").stdout)["data"]["key"]
        assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
        base = f"http://127.0.0.1:{port}"
        try:
            assert _chat(base, key, "gpt-4o-mini")[0] == 404
            done = flm_subprocess("models", "alias", "set", "gpt-4o-mini", "flm://v/qwen")
            assert done.returncode == 0, done.stdout
            status, body = _chat(base, key, "gpt-4o-mini")  # no reload, no wait
            assert status == 200 and body["model"] == "gpt-4o-mini", body
            ids = {m["id"]: m for m in _call(f"{base}/v1/models", key)[1]["data"]}
            assert ids["gpt-4o-mini"]["flm_id"] == "flm://v/qwen"
            assert flm_subprocess("models", "alias", "remove", "gpt-4o-mini").returncode == 0
            assert _chat(base, key, "gpt-4o-mini")[0] == 404
        finally:
            flm_subprocess("proxy", "stop", "--all")
