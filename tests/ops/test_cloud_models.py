"""Local-only guarantee: Ollama cloud models are hidden and refused unless the policy allows."""

from __future__ import annotations

import json
from typing import Any

from flm.core.models import is_cloud_model
from flm.testing.emulators import start_emulator
from flm.testing.gateway import start_gateway
from tests.conftest import audit_rows
from tests.security.conftest import Env

CLOUD = "gpt-oss:120b-cloud"


def test_cloud_names_and_remote_details() -> None:
    assert is_cloud_model("gpt-oss:120b-cloud")
    assert is_cloud_model("qwen3-coder:cloud")
    assert is_cloud_model("deepseek-v3.1-cloud")
    assert not is_cloud_model("llama3.2:1b")
    assert not is_cloud_model("cloudy:7b")
    assert is_cloud_model("glm", {"remote_host": "https://ollama.com:443", "remote_model": "glm"})
    assert is_cloud_model("glm", {}, {"details": {"remote_host": "https://ollama.com:443"}})
    assert not is_cloud_model("glm", {"remote_host": ""}, None)


def _models(env: Env) -> list[str]:
    status, _h, body = env.request("GET", "/v1/models")
    assert status == 200
    return [m["id"] for m in json.loads(body)["data"]]


def test_cloud_model_hidden_refused_then_served_when_allowed(cli: Any, flm_home: Any) -> None:
    with start_emulator("ollama", models=["llama3.2:1b", CLOUD]) as emu:
        cli("engines", "add", "--kind", "ollama", "--url", emu.url, "--id", "eng")
        key = cli("api-keys", "create", "--label", "c").data["key"]
        listed = cli("models", "list", "--engine", "eng").data["models"]
        marks = {m["name"]: m["cloud"] for m in listed}
        assert marks == {"llama3.2:1b": False, CLOUD: True}
        text = cli("models", "list", "--engine", "eng", "--format", "text").out
        assert "allow_cloud_models" in text
        with start_gateway() as gw:
            env = Env(gw, emu, key, cli)
            # hidden as an flm:// id and as a plain name
            assert _models(env) == ["flm://eng/llama3.2:1b", "llama3.2:1b"]
            chats_before = len([r for r in emu.requests if r[1] == "/api/chat"])
            status, _h, body = env.request(
                "POST",
                "/v1/chat/completions",
                body={
                    "model": f"flm://eng/{CLOUD}",
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert status == 403, body
            assert json.loads(body)["error"]["code"] == "cloud_model_blocked"
            assert len([r for r in emu.requests if r[1] == "/api/chat"]) == chats_before
            status, _h, _b = env.request("GET", f"/v1/models/flm://eng/{CLOUD}")
            assert status == 404
            # the plain name is refused the same way, before anything reaches the engine
            status, _h, body = env.request(
                "POST",
                "/v1/chat/completions",
                body={"model": CLOUD, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert status == 403, body
            assert json.loads(body)["error"]["code"] == "cloud_model_blocked"
            assert len([r for r in emu.requests if r[1] == "/api/chat"]) == chats_before
            rows = audit_rows(
                flm_home,
                "SELECT severity, details_json FROM audit_logs WHERE "
                "event_type = 'cloud_model_blocked'",
                flush=gw.runtime.audit.flush,
            )
            assert rows and rows[0][0] == "medium" and CLOUD in rows[0][1]
            refused = audit_rows(
                flm_home,
                "SELECT status FROM audit_logs WHERE error_type = 'cloud_model_blocked'",
                flush=gw.runtime.audit.flush,
            )
            assert refused == [(403,), (403,)]
            # local models still work
            status, _h, body = env.request(
                "POST",
                "/v1/chat/completions",
                body={
                    "model": "flm://eng/llama3.2:1b",
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
            assert status == 200, body

            env.policy({"allow_cloud_models": True})
            assert _models(env) == [
                "flm://eng/gpt-oss:120b-cloud",
                "flm://eng/llama3.2:1b",
                CLOUD,
                "llama3.2:1b",
            ]
            status, _h, body = env.request(
                "POST",
                "/v1/chat/completions",
                body={
                    "model": f"flm://eng/{CLOUD}",
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert status == 200, body
