"""Model profiles fill unset parameters; API prompts rewrite the messages (SPEC §4.2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flm.testing.emulators import expected_reply, start_emulator
from flm.testing.gateway import start_gateway
from tests.proxy.test_gateway import _request


def _chat(
    url: str, key: str, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> dict[str, Any]:
    status, _, raw = _request(
        url,
        "POST",
        path,
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert status == 200, raw
    return json.loads(raw)  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["vllm", "ollama"])
def test_profiles_and_prompts_reach_the_engine(cli: Any, tmp_path: Path, kind: str) -> None:
    with start_emulator(kind, models=["m:1"]) as emu:
        cli("engines", "add", "--kind", kind, "--url", emu.url, "--id", "e")
        key = cli("api-keys", "create", "--label", "p").data["key"]
        params = tmp_path / "p.json"
        params.write_text(json.dumps({"max_tokens": 2}))
        saved = cli(
            "model-profiles",
            "save",
            "--engine",
            "e",
            "--model",
            "m:1",
            "--label",
            "short",
            "--params",
            str(params),
        )
        assert saved.code == 0 and saved.data["version"] == 1
        template = tmp_path / "t.txt"
        template.write_text("Answer briefly: {{user_message}}\n")
        assert (
            cli(
                "api", "prompts", "set", "--api-id", "chat_completions", "--file", str(template)
            ).code
            == 0
        )
        with start_gateway() as gw:
            msgs = [{"role": "user", "content": "tell me everything"}]
            reply = _chat(gw.url, key, {"model": "flm://e/m:1", "messages": msgs})
            # the profile's max_tokens cut the reply to two words
            choice = reply["choices"][0]
            assert choice["finish_reason"] == "length"
            assert choice["message"]["content"].split() == ["You", "said:"]
            # a parameter the request sets wins over the profile; the template was applied
            reply = _chat(
                gw.url, key, {"model": "flm://e/m:1", "messages": msgs, "max_tokens": 100}
            )
            assert reply["choices"][0]["message"]["content"] == expected_reply(
                "Answer briefly: tell me everything"
            )
            # the Responses API has its own template (none set): the text arrives unchanged
            out = _chat(
                gw.url,
                key,
                {"model": "flm://e/m:1", "input": "plain", "max_output_tokens": 100},
                "/v1/responses",
            )
            assert out["output"][0]["content"][0]["text"] == expected_reply("plain")


def test_profile_and_prompt_commands_validate(cli: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    for document in ({"temperature": 9}, {"nucleus": 1}, [], {"max_tokens": "x"}):
        bad.write_text(json.dumps(document))
        result = cli(
            "model-profiles",
            "save",
            "--engine",
            "e",
            "--model",
            "m",
            "--label",
            "l",
            "--params",
            str(bad),
        )
        assert result.code == 1 and result.error["code"] == "INVALID_ARGUMENT"
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"temperature": 0.3, "stop": ["\n\n"]}))
    first = cli(
        "model-profiles",
        "save",
        "--engine",
        "e",
        "--model",
        "m",
        "--label",
        "l",
        "--params",
        str(good),
    ).data
    again = cli(
        "model-profiles",
        "save",
        "--engine",
        "e",
        "--model",
        "m",
        "--label",
        "l",
        "--params",
        str(good),
    ).data
    assert again["id"] == first["id"] and again["version"] == 2
    assert [p["id"] for p in cli("model-profiles", "list", "--engine", "e").data] == [first["id"]]
    assert cli("model-profiles", "delete", "--id", first["id"]).code == 0
    missing = cli("model-profiles", "delete", "--id", first["id"])
    assert missing.code == 1 and missing.error["code"] == "PROFILE_NOT_FOUND"
    wrong_api = cli("api", "prompts", "set", "--api-id", "embeddings", stdin="x")
    assert wrong_api.code == 1
    assert cli("api", "prompts", "set", "--api-id", "responses", stdin="Be kind.").code == 0
    assert (
        cli("api", "prompts", "show", "--api-id", "responses").data["template_text"] == "Be kind."
    )
    assert cli("api", "prompts", "delete", "--api-id", "responses").code == 0
    assert (
        cli("api", "prompts", "show", "--api-id", "responses").error["code"] == "PROMPT_NOT_FOUND"
    )


def test_prompt_without_placeholder_becomes_a_system_message() -> None:
    from flm.services.profiles import apply_prompt

    messages = [{"role": "user", "content": "hi"}]
    assert apply_prompt(messages, "Be kind.") == [
        {"role": "system", "content": "Be kind."},
        *messages,
    ]
    assert apply_prompt(messages, "Q: {{user_message}}") == [{"role": "user", "content": "Q: hi"}]
    assert apply_prompt([{"role": "assistant", "content": "x"}], "Q: {{user_message}}") is None
