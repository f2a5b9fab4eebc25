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
_PROMPT, _INPUT = b'"prompt_tokens":', b'"input_tokens":'
_COMPLETION, _OUTPUT = b'"completion_tokens":', b'"output_tokens":'


def usage_from_bytes(raw: bytes) -> dict[str, int] | None:
    """Token counts of a JSON reply or chunk without parsing it: they sit in its last
    ``usage`` object (the same keys inside a string would be escaped, so cannot match). The
    chat names win over the Responses API's (``input_tokens``/``output_tokens``). (Written
    out: it runs after every reply.)"""
    at = raw.rfind(b'"usage":{')
    if at < 0:
        return None
    found: dict[str, int] = {}
    pos = raw.find(_PROMPT, at)
    match = _NUMBER.match(raw, pos + len(_PROMPT)) if pos >= 0 else None
    if match is None:
        pos = raw.find(_INPUT, at)
        match = _NUMBER.match(raw, pos + len(_INPUT)) if pos >= 0 else None
    if match is not None:
        found["prompt_tokens"] = int(match[1])
    pos = raw.find(_COMPLETION, at)
    match = _NUMBER.match(raw, pos + len(_COMPLETION)) if pos >= 0 else None
    if match is None:
        pos = raw.find(_OUTPUT, at)
        match = _NUMBER.match(raw, pos + len(_OUTPUT)) if pos >= 0 else None
    if match is not None:
        found["completion_tokens"] = int(match[1])
    return found or None


def encode_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def iter_sse_regions(
    chunks: AsyncIterator[bytes], max_event: int = MAX_EVENT_BYTES
) -> AsyncIterator[bytes]:
    """The SSE events completed by each upstream read, as one piece of the stream per read
    (line ends normalised to ``\\n``, ending with the blank line of its last event), so a
    burst of events costs one downstream write. An event larger than ``max_event`` raises;
    an unterminated last event is yielded with its blank line added."""
    buf = b""
    async for chunk in chunks:
        buf = buf + chunk if buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            if len(buf) > max_event:
                raise EngineApiError(f"engine sent an event larger than {max_event} bytes")
            continue
        region, buf = buf[: cut + 2], buf[cut + 2 :]
        if len(region) > max_event and any(len(e) > max_event for e in region.split(b"\n\n")):
            raise EngineApiError(f"engine sent an event larger than {max_event} bytes")
        yield region
        if len(buf) > max_event:
            raise EngineApiError(f"engine sent an event larger than {max_event} bytes")
    if buf.strip():
        yield buf + b"\n\n"


def region_data(region: bytes) -> list[bytes]:
    """The ``data`` payloads of the events of a piece :func:`iter_sse_regions` yielded
    (multi-line data joined with ``\\n``; events without data left out)."""
    out: list[bytes] = []
    for event in region.split(b"\n\n"):
        data = _data_of(event) if event else None
        if data is not None:
            out.append(data)
    return out


def rewrite_region(region: bytes, needle: bytes, replacement: bytes) -> tuple[bytes, bool] | None:
    """A piece of an OpenAI-style stream with ``needle`` replaced by ``replacement`` once in
    each event, and whether it ends the stream, when it is the usual shape: one-line
    ``data: {...}`` events, each naming ``needle`` once, none an error, optionally closed by
    ``data: [DONE]``. ``None`` otherwise (the caller then goes event by event). Equal, byte
    for byte, to rewriting and re-framing each event alone; a stream's whole read costs a
    few scans of C code instead of a Python turn per event."""
    finished = region.endswith(DONE)
    body = region[: -len(DONE)] if finished else region
    events = body.count(b"\n\n")
    if (
        not events
        or not body.startswith(b"data: {")
        or body.count(b"\n") != 2 * events  # (no multi-line data, comments or fields)
        or body.count(b"\n\ndata: {") != events - 1
        or body.count(b"}\n\n") != events
        or body.count(needle) != events
        or b'data: {"error"' in body
    ):
        return None
    return body.replace(needle, replacement) + (DONE if finished else b""), finished


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
