"""Translation rules (SPEC §4.2) as a table, and the raw-forwarding shortcut."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flm.core.models import Capabilities, split_model_id
from flm.openai.errors import HttpError
from flm.openai.translate import chat_target, plan_chat, raw_with_model

PLAIN = Capabilities()
VLLM = Capabilities(multiple_choices=True)
NARROW = Capabilities(sampling_params=frozenset({"temperature", "max_tokens"}))
VISION = Capabilities(vision_inputs=True)
MSG = [{"role": "user", "content": "hi"}]
PNG = "data:image/png;base64,iVBORw0KGgo="


def _plan(body: dict[str, Any], caps: Capabilities = PLAIN) -> Any:
    parts = split_model_id(chat_target(body))
    assert parts is not None
    engine, model = parts
    return plan_chat(body, engine, model, caps)


@pytest.mark.parametrize(
    ("extra", "caps", "expect_body", "warning", "unchanged"),
    [
        ({}, PLAIN, {}, None, True),
        ({"temperature": 0.5}, PLAIN, {"temperature": 0.5}, None, True),
        ({"temperature": 7}, PLAIN, {"temperature": 2.0}, "temperature clamped", False),
        ({"temperature": -1}, PLAIN, {"temperature": 0.0}, "temperature clamped", False),
        ({"n": 3}, PLAIN, {}, "n forced to 1", False),
        ({"n": 3}, VLLM, {"n": 3}, None, True),
        ({"logit_bias": {"1": 2}}, NARROW, {}, "logit_bias dropped", False),
        ({"stop": ["x"]}, NARROW, {}, "stop dropped", False),
        ({"top_k": 5}, PLAIN, {"top_k": 5}, None, True),
        (
            {"response_format": {"type": "json_object"}},
            PLAIN,
            {"response_format": {"type": "json_object"}},
            None,
            True,
        ),
        ({"chat_template": "{{ 7*7 }}"}, VLLM, {}, "chat_template dropped", False),
        (
            {"kv_transfer_params": {"remote_host": "10.0.0.9"}},
            VLLM,
            {},
            "kv_transfer_params dropped",
            False,
        ),
    ],
)
def test_parameter_rules(
    extra: dict[str, Any],
    caps: Capabilities,
    expect_body: dict[str, Any],
    warning: str | None,
    unchanged: bool,
) -> None:
    plan = _plan({"model": "flm://e/m", "messages": MSG, **extra}, caps)
    assert plan.body["model"] == "m"
    for key, value in expect_body.items():
        assert plan.body[key] == value
    for key in set(extra) - set(expect_body):
        assert key not in plan.body
    assert (warning is None) == (not plan.warnings)
    if warning:
        assert any(warning in w for w in plan.warnings)
    assert plan.unchanged is unchanged


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "", "messages": MSG}, 400, "invalid_model"),
        ({"model": 7, "messages": MSG}, 400, "invalid_model"),
        ({"model": "flm://e", "messages": MSG}, 400, "invalid_model"),
        ({"model": "flm://e/m", "messages": []}, 400, "invalid_request"),
        (
            {"model": "flm://e/m", "messages": MSG, "response_format": {"type": "xml"}},
            400,
            "unsupported_parameter",
        ),
        ({"model": "flm://e/m", "messages": MSG, "temperature": "hot"}, 400, "invalid_request"),
        (
            {
                "model": "flm://e/m",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}
                ],
            },
            422,
            "unsupported_modalities",
        ),
        (
            {
                "model": "flm://e/m",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "http://plain/x.png"}}
                        ],
                    }
                ],
            },
            400,
            "invalid_request",
        ),
        (
            {
                "model": "flm://e/m",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/gif;base64,R0lG"},
                            }
                        ],
                    }
                ],
            },
            422,
            "unsupported_modalities",
        ),
        (
            {
                "model": "flm://e/m",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
                        ],
                    }
                ],
            },
            422,
            "unsupported_modalities",
        ),
    ],
)
def test_refusals(body: dict[str, Any], status: int, code: str) -> None:
    with pytest.raises(HttpError) as err:
        _plan(body)
    assert (err.value.status, err.value.code) == (status, code)


def test_image_parts_are_normalised_for_vision_engines() -> None:
    plan = _plan(
        {
            "model": "flm://e/m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what"},
                        {"type": "input_image", "image_url": PNG},
                    ],
                }
            ],
        },
        VISION,
    )
    parts = plan.body["messages"][0]["content"]
    assert parts == [
        {"type": "text", "text": "what"},
        {"type": "image_url", "image_url": {"url": PNG}},
    ]
    assert plan.has_images and not plan.unchanged


@pytest.mark.parametrize("spaced", [False, True])
def test_raw_forwarding_replaces_only_the_model(spaced: bool) -> None:
    body = {
        "model": "flm://e/m:1",
        "messages": [{"role": "user", "content": 'quote "model":"flm://e/m:1" here'}],
        "temperature": 1,
    }
    raw = json.dumps(body, separators=None if spaced else (",", ":")).encode()
    out = raw_with_model(raw, "flm://e/m:1", "m:1")
    assert out is not None
    assert json.loads(out) == {**body, "model": "m:1"}


def test_raw_forwarding_declines_when_ambiguous() -> None:
    raw = b'{"model":"flm://e/m","x":{"model":"flm://e/m"},"messages":[]}'
    assert raw_with_model(raw, "flm://e/m", "m") is None


def test_raw_forwarding_declines_a_nested_model_beside_a_spaced_top_level_one() -> None:
    """The compact form nested (in metadata) and the spaced form at the top: rewriting the
    nested one would send the flm:// id to the engine and change the client's metadata."""
    raw = b'{"model": "flm://e/m", "metadata": {"model":"flm://e/m"}, "messages": []}'
    assert raw_with_model(raw, "flm://e/m", "m") is None
    repeated = b'{"model":"secret","model":"flm://e/m","messages":[]}'  # a repeated key
    assert raw_with_model(repeated, "flm://e/m", "m") is None


def test_stream_must_be_a_boolean_and_n_may_be_null() -> None:
    with pytest.raises(HttpError) as caught:
        _plan({"model": "flm://e/m", "messages": MSG, "stream": "false"})
    assert caught.value.status == 400 and "stream" in caught.value.message
    plan = _plan({"model": "flm://e/m", "messages": MSG, "stream": None, "n": None})
    assert plan.stream is False and "n" not in plan.body
