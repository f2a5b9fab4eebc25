"""The Responses API on top of chat: requests mapped (tools, their calls and results,
``text.format``; the rest refused, never dropped) and replies shaped (function calls as output
items, the streamed event order)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flm.openai.errors import HttpError
from flm.openai.translate import responses_to_chat
from flm.proxy.routes.chat import _response_events, _response_object


def test_tool_turns_tools_and_format_are_mapped() -> None:
    chat = responses_to_chat(
        {
            "model": "flm://e/m",
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": "weather and time in Paris?"},
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "weather",
                    "arguments": '{"city":"Paris"}',
                },
                {"type": "function_call", "call_id": "c2", "name": "clock", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18C"},
                {"type": "function_call_output", "call_id": "c2", "output": {"t": "12:00"}},
            ],
            "tools": [
                {
                    "type": "function",
                    "name": "weather",
                    "description": "d",
                    "parameters": {"type": "object"},
                    "strict": True,
                }
            ],
            "tool_choice": {"type": "function", "name": "weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather and time in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": '{"t": "12:00"}'},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "d",
                "parameters": {"type": "object"},
                "strict": True,
            },
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}},
    }


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [{"type": "web_search"}]},
        {"input": [{"type": "reasoning", "summary": []}]},
        {"text": {"format": {"type": "grammar"}}},
        {"tool_choice": "sometimes"},
    ],
)
def test_what_cannot_be_mapped_is_refused(extra: dict[str, Any]) -> None:
    with pytest.raises(HttpError) as caught:
        responses_to_chat({"model": "flm://e/m", "input": "hi", **extra})
    assert caught.value.status == 400 and caught.value.code == "unsupported_parameter"


def test_function_calls_become_output_items() -> None:
    reply = {
        "choices": [
            {
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
    out = _response_object(reply, "flm://e/m")["output"]
    assert [o["type"] for o in out] == ["function_call"]
    assert {k: out[0][k] for k in ("call_id", "name", "arguments", "status")} == {
        "call_id": "call_1",
        "name": "weather",
        "arguments": '{"city":"Paris"}',
        "status": "completed",
    }


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return (
        b"data: "
        + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode()
        + b"\n\n"
    )


def test_streamed_events_in_order_with_a_function_call() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield _chunk({"role": "assistant", "content": "Let me check."})
        yield _chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "weather", "arguments": ""},
                    }
                ]
            }
        )
        yield _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]})
        yield (
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})
            + _chunk({}, "tool_calls")
            + b"data: [DONE]\n\n"
        )

    async def collect() -> list[dict[str, Any]]:
        raw = b"".join([b async for b in _response_events(chunks(), "flm://e/m")])
        return [
            json.loads(block.split("\ndata: ", 1)[1])
            for block in raw.decode().split("\n\n")
            if block
        ]

    events = asyncio.run(collect())
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]["output"]
    assert final[0]["content"][0]["text"] == "Let me check."
    assert {k: final[1][k] for k in ("type", "call_id", "name", "arguments")} == {
        "type": "function_call",
        "call_id": "call_9",
        "name": "weather",
        "arguments": '{"city":"Paris"}',
    }
