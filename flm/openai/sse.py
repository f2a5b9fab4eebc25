"""Server-sent events and NDJSON framing with hard per-event size limits."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from flm.core.errors import EngineApiError

DONE = b"data: [DONE]\n\n"
#: Largest single SSE event or NDJSON line accepted from an engine.
MAX_EVENT_BYTES = 1024 * 1024


_NUMBER = re.compile(rb" *(\d+)")
_USAGE_KEYS = (
    ("prompt_tokens", b'"prompt_tokens":', b'"input_tokens":'),
    ("completion_tokens", b'"completion_tokens":', b'"output_tokens":'),
)


def usage_from_bytes(raw: bytes) -> dict[str, int] | None:
    """Token counts of a JSON reply or chunk without parsing it: they sit in its last
    ``usage`` object (the same keys inside a string would be escaped, so cannot match). The
    chat names win over the Responses API's (``input_tokens``/``output_tokens``)."""
    at = raw.rfind(b'"usage":{')
    if at < 0:
        return None
    found: dict[str, int] = {}
    for key, name, alias in _USAGE_KEYS:
        for needle in (name, alias):
            pos = raw.find(needle, at)
            if pos >= 0:
                match = _NUMBER.match(raw, pos + len(needle))
                if match is not None:
                    found[key] = int(match[1])
                    break
    return found or None


def encode_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def iter_sse_batches(
    chunks: AsyncIterator[bytes], max_event: int = MAX_EVENT_BYTES
) -> AsyncIterator[list[bytes]]:
    """The ``data`` payloads of the SSE events completed by each upstream read, as one list per
    read, so a burst of events costs one downstream write. Events are split on blank lines
    (``\\n\\n``, after normalising ``\\r\\n``); multi-line data is joined with ``\\n``."""
    buf = b""
    async for chunk in chunks:
        buf = buf + chunk if buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        if b"\n\n" not in buf:
            if len(buf) > max_event:
                raise EngineApiError(f"engine sent an event larger than {max_event} bytes")
            continue
        *events, buf = buf.split(b"\n\n")
        out: list[bytes] = []
        for event in events:
            if len(event) > max_event:
                raise EngineApiError(f"engine sent an event larger than {max_event} bytes")
            data = _data_of(event)
            if data is not None:
                out.append(data)
        if out:
            yield out
        if len(buf) > max_event:
            raise EngineApiError(f"engine sent an event larger than {max_event} bytes")
    last = _data_of(buf) if buf.strip() else None
    if last is not None:
        yield [last]


def _data_of(event: bytes) -> bytes | None:
    """The ``data`` of one SSE event (multi-line data joined with ``\\n``); ``None`` when the
    event carries none (comments, ``event:``/``id:``/``retry:`` only). llama.cpp's server
    reports a failure mid-stream in a field of its own, ``error: {...}``: that becomes
    ``{"error": {...}}``, which the stream readers raise as the engine's error."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the common case: one data line
    lines = [
        line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    if lines:
        return b"\n".join(lines)
    errors = [line[6:].strip() for line in event.split(b"\n") if line.startswith(b"error:")]
    if not errors or not errors[0]:
        return None
    detail = errors[0]
    if detail[:1] != b"{":  # a bare message
        detail = json.dumps(detail.decode("utf-8", "replace")).encode()
    return b'{"error":' + detail + b"}"


async def iter_line_batches(
    chunks: AsyncIterator[bytes], max_line: int = MAX_EVENT_BYTES
) -> AsyncIterator[list[bytes]]:
    """Non-empty NDJSON lines completed by each upstream read, one list per read."""
    buf = b""
    async for chunk in chunks:
        buf = buf + chunk if buf else chunk
        if b"\n" in buf:
            *lines, buf = buf.split(b"\n")
            batch = []
            for line in lines:
                if len(line) > max_line:
                    raise EngineApiError(f"engine sent a line longer than {max_line} bytes")
                line = line.rstrip(b"\r")
                if line.strip():
                    batch.append(line)
            if batch:
                yield batch
        if len(buf) > max_line:
            raise EngineApiError(f"engine sent a line longer than {max_line} bytes")
    if buf.strip():
        yield [buf.rstrip(b"\r")]
