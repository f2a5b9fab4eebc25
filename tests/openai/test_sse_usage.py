"""Token counts read from reply bytes without parsing them."""

from __future__ import annotations

from flm.openai.sse import usage_from_bytes


def test_usage_from_chat_and_responses_shapes() -> None:
    chat = (
        b'{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21,'
        b'"prompt_tokens_details":{"cached_tokens":3}}}'
    )
    assert usage_from_bytes(chat) == {"prompt_tokens": 12, "completion_tokens": 9}
    spaced = b'{"usage": {"prompt_tokens": 4, "completion_tokens": 5}}'.replace(b'": {', b'":{')
    assert usage_from_bytes(spaced) == {"prompt_tokens": 4, "completion_tokens": 5}
    responses = b'{"usage":{"input_tokens":7,"output_tokens":2,"total_tokens":9}}'
    assert usage_from_bytes(responses) == {"prompt_tokens": 7, "completion_tokens": 2}


def test_usage_is_taken_from_the_last_usage_object_only() -> None:
    raw = (
        b'{"choices":[{"message":{"content":"\\"prompt_tokens\\":999"}}],'
        b'"usage":{"completion_tokens":3}}'
    )
    assert usage_from_bytes(raw) == {"completion_tokens": 3}
    assert usage_from_bytes(b'{"choices":[]}') is None
    assert usage_from_bytes(b'{"usage":{"total_tokens":1}}') is None


def test_usage_in_any_engine_order_and_null_counts() -> None:
    """Engines order the usage fields differently (vLLM puts total_tokens in the middle,
    llama.cpp the completion first); a null count falls back to the other API's name."""
    vllm = b'{"usage":{"prompt_tokens":5,"total_tokens":12,"completion_tokens":7}}'
    llama = b'{"usage":{"completion_tokens":8,"prompt_tokens":3,"total_tokens":11}}'
    assert usage_from_bytes(vllm) == {"prompt_tokens": 5, "completion_tokens": 7}
    assert usage_from_bytes(llama) == {"prompt_tokens": 3, "completion_tokens": 8}
    mixed = b'{"usage":{"prompt_tokens":null,"input_tokens":4,"output_tokens":6}}'
    assert usage_from_bytes(mixed) == {"prompt_tokens": 4, "completion_tokens": 6}
    assert usage_from_bytes(b'{"usage":{"prompt_tokens":2}}') == {"prompt_tokens": 2}
