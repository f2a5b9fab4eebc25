"""Server-sent events and NDJSON framing with hard per-event size limits."""

from __future__ import annotations

from collections.abc import AsyncIterator

from flm.core.errors import EngineApiError

DONE = b"data: [DONE]\n\n"
#: Largest single SSE event or NDJSON line accepted from an engine.
MAX_EVENT_BYTES = 1024 * 1024


def encode_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def iter_lines(
    chunks: AsyncIterator[bytes], max_line: int = MAX_EVENT_BYTES
) -> AsyncIterator[bytes]:
    """Split a byte stream into lines (``\\n``; ``\\r`` stripped). A line longer than
    ``max_line`` raises instead of growing the buffer without bound."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1 :]
            yield line.rstrip(b"\r")
        if len(buf) > max_line:
            raise EngineApiError(f"engine sent a line longer than {max_line} bytes")
    if buf.strip():
        yield buf.rstrip(b"\r")


async def iter_sse_data(
    chunks: AsyncIterator[bytes], max_event: int = MAX_EVENT_BYTES
) -> AsyncIterator[bytes]:
    """Yield the ``data`` payload of each SSE event (multi-line data joined with ``\\n``)."""
    data: list[bytes] = []
    size = 0
    async for line in iter_lines(chunks, max_event):
        if not line:
            if data:
                yield b"\n".join(data)
                data, size = [], 0
            continue
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            size += len(value)
            if size > max_event:
                raise EngineApiError(f"engine sent an event larger than {max_event} bytes")
            data.append(value)
        # comments (":"), "event:", "id:" and "retry:" lines carry nothing FLM forwards
    if data:
        yield b"\n".join(data)
