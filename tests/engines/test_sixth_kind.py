"""A new engine kind is one file (``tgi_kind.py``): registered from it alone, it gets
detection, models, chat through the gateway and a pass-through that forwards only what its
descriptor lists."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.error import HTTPError

import pytest

from flm.engines import kinds
from flm.testing.emulators import Emulator
from flm.testing.gateway import start_gateway


@pytest.fixture
def tgi() -> Iterator[Any]:
    from tests.engines import tgi_kind

    kinds.register(tgi_kind.DESCRIPTOR)  # (again, if an earlier test removed it)
    with Emulator(tgi_kind.TgiEmulator(["small-chat"])).start() as emu:
        yield emu
    kinds.unregister("tgi")


def _call(url: str, key: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(  # noqa: S310 - loopback
        url,
        data=data,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            raw = resp.read()
            status = resp.status
    except HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def test_a_kind_registered_from_one_file_is_detected_listed_and_served(cli: Any, tgi: Any) -> None:
    assert kinds.help_text().endswith("llamacpp or tgi")  # `flm engines add --help`
    assert cli("engines", "add", "--kind", "tgi", "--url", tgi.url, "--id", "hf").code == 0
    detected = {e["id"]: e for e in cli("engines", "detect", "--fresh").data["engines"]}
    assert detected["hf"]["kind"] == "tgi"
    assert detected["hf"]["status"] == "RunningHealthy" and detected["hf"]["version"] == "3.3.4"
    models = cli("models", "list").data["models"]
    assert any(m["engine_id"] == "hf" and m["name"] == "small-chat" for m in models), models
    key = cli("api-keys", "create", "--label", "t").data["key"]
    with start_gateway() as gw:
        status, reply = _call(
            f"{gw.url}/v1/chat/completions",
            key,
            {"model": "flm://hf/small-chat", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert status == 200, reply
        assert reply["model"] == "flm://hf/small-chat" and reply["choices"][0]["message"]
        # the pass-through forwards what the descriptor lists, and nothing else
        status, info = _call(f"{gw.url}/engine/hf/info", key)
        assert status == 200 and info["version"] == "3.3.4"
        status, refused = _call(f"{gw.url}/engine/hf/metrics", key)
        assert status == 403 and refused["error"]["code"] == "route_disabled"
        assert ("GET", "/metrics") not in tgi.requests
        status, refused = _call(f"{gw.url}/engine/hf/v1/models", key)
        assert status == 403


def test_a_kind_without_a_pass_through_list_forwards_nothing(cli: Any, tgi: Any) -> None:
    from tests.engines import tgi_kind

    kinds.unregister("tgi")
    kinds.register(
        kinds.KindDescriptor(
            name=tgi_kind.TGI, label="TGI, no list", adapter=tgi_kind.TgiAdapter, default_port=3000
        )
    )
    assert cli("engines", "add", "--kind", "tgi", "--url", tgi.url, "--id", "hf").code == 0
    key = cli("api-keys", "create", "--label", "t").data["key"]
    with start_gateway() as gw:
        for path in ("/info", "/health", "/v1/models"):
            status, refused = _call(f"{gw.url}/engine/hf{path}", key)
            assert status == 403 and refused["error"]["code"] == "route_disabled", path
    assert not any(path in ("/info", "/health") for _, path in tgi.requests.snapshot())


@pytest.mark.parametrize(
    ("kind", "path", "method", "refusal"),
    [
        ("ollama", "/api/tags", "GET", None),
        ("ollama", "/api/pull", "POST", "admin"),
        ("ollama", "/api/Delete", "DELETE", "admin"),
        ("vllm", "/v1/chat/completions", "POST", None),
        ("vllm", "/v1/load_lora_adapter", "POST", "admin"),
        ("vllm", "/sleep", "POST", "admin"),
        ("lmstudio", "/api/v0/models", "GET", None),
        ("lmstudio", "/api/v1/models/load", "POST", "admin"),
        ("llamacpp", "/props", "GET", None),
        ("llamacpp", "/props", "POST", "read-only"),
        ("llamacpp", "/slots/0", "POST", "admin"),
        ("llamacpp", "/completion", "POST", None),
    ],
)
def test_built_in_pass_through_rules(
    kind: str, path: str, method: str, refusal: str | None
) -> None:
    assert kinds.get(kind).passthrough_refusal(path, method) == refusal


def test_unknown_kinds_are_the_users_error_naming_the_known_ones(cli: Any) -> None:
    result = cli("engines", "add", "--kind", "nope", "--url", "http://127.0.0.1:9")
    assert result.code != 0
    message = result.error["message"]
    assert "nope" in message and all(k in message for k in ("ollama", "vllm", "llamacpp"))
