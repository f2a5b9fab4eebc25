"""Deterministic content: what an emulated model answers, the same for every engine.


- the reply is ``REPLY_TEMPLATE`` filled with the text of the last user message, followed by
  ``" [images: N]"`` when the request carried N images (see `expected_reply`);
  ``Behaviour.reply_text`` replaces it verbatim;
- token counts are whitespace word counts: prompt = all message texts, completion = the reply;
- a streamed reply is the reply cut into ``Behaviour.stream_chunks`` consecutive character slices;
- ``max_tokens`` / ``num_predict`` smaller than the reply's word count keeps that many words and
  finishes with ``length``;
- embeddings are unit vectors of ``ModelSpec.embedding_dim`` floats derived from a SHA-256 of the
  input text (see `embedding_for`);
- tools: the model calls an offered function when the last user message names it (unless the
  conversation already ends with a tool's result), or when ``tool_choice`` forces one (a named
  function; ``required``: the named-in-text one, else the first), never with
  ``tool_choice: "none"``; the arguments are `sample_for` the function's parameter schema
  (see `tool_call_for`);
- structured output: with a JSON schema (OpenAI's ``response_format`` ``json_schema``, Ollama's
  ``format`` object) the reply is `sample_for` that schema, as JSON; with plain JSON mode
  (``json_object``, Ollama's ``"json"``) it is ``{"reply": <the usual reply>}``.

The OpenAI-compatible wire format (shared by vLLM, LM Studio and Ollama's ``/v1`` routes) lives
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flm.testing.emulators.settings import EMBEDDING_DIM, Behaviour
from flm.testing.emulators.wire import dumps

REPLY_TEMPLATE = "You said: {text}"


@dataclass
class Prompt:
    """What the emulator needs from a request's messages."""

    texts: list[str] = field(default_factory=list)
    last_user: str = ""
    images: int = 0

    @property
    def tokens(self) -> int:
        return sum(word_count(t) for t in self.texts)


def word_count(text: str) -> int:
    return len(text.split())


def expected_reply(last_user_text: str, images: int = 0) -> str:
    """The reply an emulator gives when ``Behaviour.reply_text`` is ``None``."""
    text = REPLY_TEMPLATE.format(text=last_user_text)
    if images:
        text += f" [images: {images}]"
    return text


def reply_for(behaviour: Behaviour, prompt: Prompt) -> str:
    if behaviour.reply_text is not None:
        return behaviour.reply_text
    return expected_reply(prompt.last_user, prompt.images)


def limit_words(text: str, limit: object) -> tuple[str, str]:
    """Apply a max-token limit (in words); returns the text and the finish reason."""
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < word_count(text):
        return " ".join(text.split()[:limit]), "length"
    return text, "stop"


def split_text(text: str, parts: int) -> list[str]:
    """Cut ``text`` into exactly ``parts`` consecutive slices (some empty if it is shorter)."""
    n = max(1, parts)
    size = len(text)
    return [text[i * size // n : (i + 1) * size // n] for i in range(n)]


def sample_for(schema: object) -> Any:
    """A deterministic value matching a JSON schema: an object's properties (its required ones,
    or all when none are listed), an enum's first value, ``"text"``, ``1``, ``True``, and a
    one-item array."""
    if not isinstance(schema, dict):
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        assert isinstance(props, dict)
        wanted = schema.get("required") if isinstance(schema.get("required"), list) else None
        return {
            name: sample_for(sub) for name, sub in props.items() if wanted is None or name in wanted
        }
    if kind == "string":
        return "text"
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return [sample_for(schema.get("items"))]
    return None


def tool_call_for(
    tools: object, choice: object, last_user: str, last_role: object = None
) -> tuple[str, Any] | None:
    """The function a model "decides" to call and its arguments, or ``None`` (see the module
    documentation). Once the conversation ends with a tool's result the model answers in
    text unless ``tool_choice`` forces a call."""
    functions: dict[str, Any] = {}
    for tool in tools if isinstance(tools, list) else []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            functions[fn["name"]] = fn.get("parameters")
    if not functions or choice == "none":
        return None
    if last_role == "tool" and not (isinstance(choice, dict) or choice == "required"):
        return None
    named = next((n for n in functions if n in last_user), None)
    if isinstance(choice, dict):
        fn = choice.get("function")
        forced = fn.get("name") if isinstance(fn, dict) else None
        named = forced if forced in functions else None
    elif choice == "required":
        named = named or next(iter(functions))
    if named is None:
        return None
    return named, sample_for(functions[named]) or {}


def structured_reply(fmt: object, text: str) -> str:
    """The reply under OpenAI's ``response_format`` (unchanged for ``text`` or none)."""
    if not isinstance(fmt, dict):
        return text
    if fmt.get("type") == "json_object":
        return dumps({"reply": text})
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        return dumps(sample_for(spec.get("schema") if isinstance(spec, dict) else None))
    return text


def embedding_for(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector for ``text`` (values rounded to 8 decimals)."""
    raw = b""
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    ints = struct.unpack(f"<{dim}I", raw[: dim * 4])
    values = [n / 0xFFFFFFFF * 2.0 - 1.0 for n in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 8) for v in values]


def embedding_base64(vector: Sequence[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32 values, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def text_of_content(content: object) -> tuple[str, int]:
    """Text and image count of an OpenAI message ``content`` (string or list of parts)."""
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    images = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_image"):
                images += 1
    return " ".join(texts), images


def digest_of(name: str) -> str:
    """A model's content digest (derived from its name)."""
    return hashlib.sha256(name.encode()).hexdigest()
