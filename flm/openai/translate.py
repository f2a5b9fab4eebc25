"""Request translation rules (SPEC §4.2), pure functions driven by engine capabilities."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from flm.core.models import Capabilities, model_id_problem
from flm.openai.errors import HttpError

_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
_DATA_URI = re.compile(r"^data:([a-z0-9.+/-]+);base64,(.*)$", re.IGNORECASE | re.DOTALL)
_KNOWN_FORMATS = {"text", "json_object", "json_schema"}
#: Parameters every adapter understands (structure, not sampling).
_STRUCTURAL = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "n",
    "response_format",
    "tools",
    "tool_choice",
    "user",
    "parallel_tool_calls",
    "modalities",
    "audio",
    "metadata",
    "store",
    "logprobs",
    "top_logprobs",
    "reasoning_effort",
    "service_tier",
}
#: Sampling parameters dropped (with a warning) by engines that do not list them.
_DROPPABLE = frozenset(
    {
        "logit_bias",
        "presence_penalty",
        "frequency_penalty",
        "stop",
        "seed",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
    }
)
#: Request fields that steer the engine itself rather than this request: a server-side
#: template to render (vLLM and llama.cpp accept one per request) and vLLM's KV-cache transfer
#: parameters (hosts the engine should exchange cache with). Never from an API client.
_ENGINE_CONTROL = frozenset({"chat_template", "kv_transfer_params"})
#: Keys :func:`plan_chat` looks at; any other key goes to the engine as it is.
_CHECKED = frozenset(
    {"messages", "temperature", "n", "response_format", *_DROPPABLE, *_ENGINE_CONTROL}
)
MAX_INLINE_IMAGE = 8 * 1024 * 1024


@dataclass
class ChatPlan:
    """A validated chat request: where it goes and what the engine receives."""

    engine_id: str
    model: str
    body: dict[str, Any]
    stream: bool
    has_images: bool = False
    has_audio: bool = False
    image_urls: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The engine body is the client's, but for the model name: the raw request bytes can be
    #: forwarded with the model replaced, instead of serialising ``body`` again.
    unchanged: bool = True


def parse_model(value: Any) -> str:
    """The model a request names: an ``flm://engine/model`` id, a plain model name or an alias
    (the proxy's engine registry resolves the latter two)."""
    if not isinstance(value, str) or not value:
        raise HttpError(400, "invalid_model", "'model' is required and must be a string")
    problem = model_id_problem(value)
    if problem is not None:
        # (repr escapes what is not printable: the message is safe to echo and log)
        raise HttpError(400, "invalid_model", f"{problem}, got {value[:200]!r}")
    return value


def _inline_image_size(url: str) -> int:
    match = _DATA_URI.match(url)
    if match is None:
        raise HttpError(400, "invalid_request", "image data URI must be base64-encoded")
    mime = match[1].lower()
    if mime not in _IMAGE_TYPES:
        raise HttpError(
            422, "unsupported_modalities", f"image type {mime} not accepted (PNG, JPEG or WebP)"
        )
    payload = match[2]
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "invalid_request", "image data URI is not valid base64") from None
    return len(raw)


def _normalise_parts(content: list[Any], plan: ChatPlan, max_image: int) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            raise HttpError(400, "invalid_request", "message content parts must be objects")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind in ("image_url", "input_image"):
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise HttpError(400, "invalid_request", "image part without a url")
            plan.has_images = True
            if url.startswith("data:"):
                size = _inline_image_size(url)
                if size > max_image:
                    raise HttpError(
                        413,
                        "payload_too_large",
                        f"inline image of {size} bytes exceeds {max_image}",
                    )
            elif url.startswith("https://"):
                plan.image_urls.append(url)
            else:
                raise HttpError(
                    400, "invalid_request", "image_url must be a data: URI or an https:// URL"
                )
            detail = ref.get("detail") if isinstance(ref, dict) else None
            image: dict[str, Any] = {"url": url}
            if detail:
                image["detail"] = detail
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_audio":
            plan.has_audio = True
            parts.append(part)
        else:
            raise HttpError(400, "invalid_request", f"unknown content part type {kind!r}")
    return parts


def chat_target(body: Any) -> str:
    """The model a chat request names (see :func:`parse_model`), after the cheap shape
    checks."""
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "request body must be a JSON object")
    target = parse_model(body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "invalid_request", "'messages' must be a non-empty array")
    return target


def plan_chat(body: dict[str, Any], engine_id: str, model: str, caps: Capabilities) -> ChatPlan:
    """Validate and translate an OpenAI chat request for an engine with ``caps``."""
    messages: list[Any] = body["messages"]
    stream = body.get("stream")
    if stream is None:
        stream = False
    elif stream is not True and stream is not False:
        raise HttpError(400, "invalid_request", "'stream' must be a boolean")
    plan = ChatPlan(engine_id, model, {}, stream)
    out_messages = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HttpError(400, "invalid_request", "each message needs a string 'role'")
        content = message.get("content")
        if isinstance(content, list):
            plan.unchanged = False
            message = {
                **message,
                "content": _normalise_parts(
                    content, plan, min(caps.max_image_bytes, MAX_INLINE_IMAGE)
                ),
            }
        elif content is not None and not isinstance(content, str):
            raise HttpError(400, "invalid_request", "message content must be text or parts")
        out_messages.append(message)
    if plan.has_images and not caps.vision_inputs:
        raise HttpError(
            422, "unsupported_modalities", f"{engine_id}/{model} does not accept image inputs"
        )
    if plan.has_audio and not caps.audio_inputs:
        raise HttpError(
            422, "unsupported_modalities", f"{engine_id}/{model} does not accept audio inputs"
        )
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities and not caps.audio_outputs:
        raise HttpError(422, "unsupported_modalities", f"{engine_id}/{model} cannot produce audio")

    out: dict[str, Any] = {}
    for key, value in body.items():
        if key not in _CHECKED:
            out[key] = value  # structural, sampling or engine-specific: passed on
            continue
        if key == "messages":
            continue
        if key in _ENGINE_CONTROL:
            plan.warnings.append(f"{key} dropped: it configures the engine, not the request")
            continue
        if key in ("temperature",) and value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                raise HttpError(400, "invalid_request", "'temperature' must be a number")
            clamped = min(max(float(value), 0.0), 2.0)
            if clamped != value:
                plan.warnings.append(f"temperature clamped to {clamped:g}")
            value = clamped
        if key == "n":
            if value is None:  # (OpenAI: null means the default, 1)
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HttpError(400, "invalid_request", "'n' must be a positive integer")
            if value > 1 and not caps.multiple_choices:
                plan.warnings.append("n forced to 1: this engine returns one choice")
                continue
        if key == "response_format" and value is not None:
            kind = value.get("type") if isinstance(value, dict) else None
            if kind not in _KNOWN_FORMATS:
                raise HttpError(
                    400, "unsupported_parameter", f"response_format type {kind!r} is not supported"
                )
        if key in caps.sampling_params or key in _STRUCTURAL or key == "stream":
            out[key] = value
        elif key in _DROPPABLE:
            plan.warnings.append(f"{key} dropped: not supported by this engine")
        else:
            out[key] = value  # engine-specific extras (e.g. llama.cpp's top_k) pass through
    out["messages"] = out_messages
    out["model"] = model
    if not caps.tool_choice:
        _map_tool_choice(body, out, plan)
    if plan.warnings or plan.image_urls:
        plan.unchanged = False
    plan.body = out
    return plan


def _map_tool_choice(body: dict[str, Any], out: dict[str, Any], plan: ChatPlan) -> None:
    """For an engine without ``tool_choice`` (Ollama): a named function is mapped by offering
    only that function; ``required`` goes on with a warning (the model may still answer in
    text). ``auto`` and ``none`` need nothing (the adapter leaves the tools out for none)."""
    choice = body.get("tool_choice")
    tools = body.get("tools")
    if choice in (None, "auto", "none") or not isinstance(tools, list) or not tools:
        return
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        kept = [
            t
            for t in tools
            if isinstance(t, dict)
            and isinstance(t.get("function"), dict)
            and t["function"].get("name") == name
        ]
        if not kept:
            raise HttpError(
                400,
                "invalid_request",
                f"tool_choice names {str(name)[:100]!r}, which is not in 'tools'",
            )
        out["tools"] = kept
        plan.warnings.append(
            f"tool_choice: this engine cannot force a call; only {name} was offered to the model"
        )
    elif choice == "required":
        plan.warnings.append(
            "tool_choice required is not enforced by this engine: the model may answer in text"
        )
    else:
        raise HttpError(
            400,
            "invalid_request",
            f"tool_choice {str(choice)[:100]!r} is not auto, none, required or a function",
        )


def check_embedding_input(body: dict[str, Any], caps: Capabilities) -> None:
    """Token-id arrays to an engine that embeds text only: a clear 422 before sending."""
    data = body.get("input")
    if (
        not caps.token_inputs
        and isinstance(data, list)
        and not all(isinstance(x, str) for x in data)
    ):
        raise HttpError(
            422,
            "unsupported_parameter",
            "input: this engine embeds text only; token-id arrays are not accepted",
        )


_JSON_STRINGS: dict[str, bytes] = {}


def json_string(value: str) -> bytes:
    """``value`` as a JSON string literal, remembered: model names repeat on every request."""
    encoded = _JSON_STRINGS.get(value)
    if encoded is None:
        encoded = json.dumps(value).encode()
        if len(_JSON_STRINGS) >= 1024:
            _JSON_STRINGS.clear()
        _JSON_STRINGS[value] = encoded
    return encoded


def raw_with_model(raw: bytes, public_model: str, native_model: str) -> bytes | None:
    """``raw`` (the client's JSON) with its ``model`` value replaced, when ``"model"`` occurs
    once in the whole document, followed by that value in the compact or the usual spaced
    form; ``None`` otherwise (the caller then serialises the parsed body). A second
    ``"model"`` anywhere, nested or a repeated key, takes the slow path: the replacement must
    never land on another field, nor leave a second model name for the engine to pick."""
    if raw.count(b'"model"') != 1:
        return None
    value = json_string(public_model)
    for needle in (b'"model":' + value, b'"model": ' + value):
        if needle in raw:
            return raw.replace(needle, b'"model":' + json_string(native_model))
    return None


def plan_embeddings(body: Any) -> tuple[str, dict[str, Any]]:
    """The model named and the body, checked; the caller puts the engine's model name in."""
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "request body must be a JSON object")
    model = parse_model(body.get("model"))
    data = body.get("input")
    ok = isinstance(data, str) or (
        isinstance(data, list) and data and all(isinstance(x, (str, int, list)) for x in data)
    )
    if not ok:
        raise HttpError(400, "invalid_request", "'input' must be a string or a non-empty array")
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise HttpError(400, "unsupported_parameter", f"encoding_format {fmt!r}")
    return model, dict(body)


def _responses_tools(tools: Any) -> list[dict[str, Any]]:
    """Responses function tools (``{type, name, parameters…}``) in the chat shape."""
    if not isinstance(tools, list):
        raise HttpError(400, "invalid_request", "'tools' must be an array")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise HttpError(
                400,
                "unsupported_parameter",
                f"tool type {kind!r} is not supported (function tools only)",
            )
        out.append(
            {
                "type": "function",
                "function": {
                    k: v
                    for k, v in tool.items()
                    if k in ("name", "description", "parameters", "strict")
                },
            }
        )
    return out


def _responses_format(text: Any) -> dict[str, Any] | None:
    """``text.format`` of a Responses request as a chat ``response_format``."""
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        return {
            "type": "json_schema",
            "json_schema": {
                k: v for k, v in fmt.items() if k in ("name", "schema", "strict", "description")
            },
        }
    raise HttpError(400, "unsupported_parameter", f"text.format type {kind!r} is not supported")


def _responses_item(item: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
    """Append a tool-call item (a call the model made, or its result) as chat messages;
    False when ``item`` is not one."""
    kind = item.get("type")
    if kind == "function_call":
        call = {
            "id": str(item.get("call_id") or item.get("id") or ""),
            "type": "function",
            "function": {
                "name": str(item.get("name") or ""),
                "arguments": str(item.get("arguments") or ""),
            },
        }
        last = messages[-1] if messages else None
        if last is not None and last.get("role") == "assistant" and last.get("tool_calls"):
            last["tool_calls"].append(call)  # parallel calls: one assistant turn
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        return True
    if kind == "function_call_output":
        output = item.get("output")
        messages.append(
            {
                "role": "tool",
                "tool_call_id": str(item.get("call_id") or ""),
                "content": output if isinstance(output, str) else json.dumps(output),
            }
        )
        return True
    if kind not in (None, "message"):
        raise HttpError(400, "unsupported_parameter", f"input item type {kind!r} is not supported")
    return False


def responses_to_chat(body: Any) -> dict[str, Any]:
    """Map an OpenAI Responses API request onto a chat request: text and image inputs,
    function tools and their calls and results, ``text.format``; anything else structural is
    refused rather than dropped."""
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "request body must be a JSON object")
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                raise HttpError(400, "invalid_request", "input items must be objects")
            if _responses_item(item, messages):
                continue
            role = item.get("role", "user")
            content = item.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not isinstance(part, dict):
                        continue
                    kind = part.get("type")
                    if kind in ("input_text", "output_text", "text"):
                        parts.append({"type": "text", "text": part.get("text", "")})
                    elif kind == "input_image":
                        parts.append(
                            {"type": "image_url", "image_url": {"url": part.get("image_url", "")}}
                        )
                    else:
                        raise HttpError(
                            400,
                            "unsupported_parameter",
                            f"input part type {kind!r} is not supported",
                        )
                messages.append({"role": role, "content": parts})
            else:
                messages.append({"role": role, "content": content})
    else:
        raise HttpError(400, "invalid_request", "'input' must be a string or an array")
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "stream": body.get("stream", False),
    }
    for src, dst in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("max_output_tokens", "max_tokens"),
        ("parallel_tool_calls", "parallel_tool_calls"),
    ):
        if body.get(src) is not None:
            chat[dst] = body[src]
    if body.get("tools"):
        chat["tools"] = _responses_tools(body["tools"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice in ("auto", "none", "required"):
        chat["tool_choice"] = choice
    elif choice is not None:
        raise HttpError(400, "unsupported_parameter", f"tool_choice {choice!r} is not supported")
    fmt = _responses_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    return chat


def completion_target(body: Any) -> str:
    """The model a legacy text completion names, after the cheap shape checks."""
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "request body must be a JSON object")
    model = parse_model(body.get("model"))
    prompt = body.get("prompt")
    ok = isinstance(prompt, str) or (
        isinstance(prompt, list)
        and prompt
        and (
            all(isinstance(p, str) for p in prompt)
            or all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            or all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt)
        )
    )
    if not ok:
        raise HttpError(
            400, "invalid_request", "'prompt' must be a string, an array of strings, or token ids"
        )
    if body.get("stream") not in (None, True, False):
        raise HttpError(400, "invalid_request", "'stream' must be a boolean")
    return model


def plan_completion(
    body: dict[str, Any], model: str, caps: Capabilities
) -> tuple[dict[str, Any], list[str]]:
    """The engine body of a text completion and the warnings for what was changed. What the
    engine cannot do is refused (422 naming the field), never dropped quietly."""
    warnings: list[str] = []
    out = {k: v for k, v in body.items() if k not in _ENGINE_CONTROL}
    warnings += [
        f"{k} dropped: it configures the engine, not the request"
        for k in body
        if k in _ENGINE_CONTROL
    ]
    if not caps.token_inputs:
        prompt = body["prompt"]
        if not (isinstance(prompt, str) or (len(prompt) == 1 and isinstance(prompt[0], str))):
            raise HttpError(
                422,
                "unsupported_parameter",
                "prompt: this engine completes one text prompt; token-id arrays "
                "and several prompts are not accepted",
            )
        if body.get("echo"):
            raise HttpError(
                422,
                "unsupported_parameter",
                "echo: this engine cannot repeat the prompt in its reply",
            )
        for key in ("n", "best_of"):
            value = body.get(key)
            if isinstance(value, int) and value > 1:
                out.pop(key)
                warnings.append(f"{key} forced to 1: this engine returns one choice")
        for key in ("logprobs", "logit_bias", "user"):
            if body.get(key) is not None:
                out.pop(key)
                warnings.append(f"{key} dropped: not supported by this engine")
    out["model"] = model
    return out, warnings
