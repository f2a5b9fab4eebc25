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
            if event.startswith(b"data: ") and b"\n" not in event:
                out.append(event[6:])  # the common case: one data line
                continue
            data = [line[5:].removeprefix(b" ") for line in event.split(b"\n")
                    if line.startswith(b"data:")]
            if data:
                out.append(b"\n".join(data))
        if out:
            yield out
        if len(buf) > max_event:
            raise EngineApiError(f"engine sent an event larger than {max_event} bytes")
    if buf.strip():
        data = [line[5:].removeprefix(b" ") for line in buf.split(b"\n")
                if line.startswith(b"data:")]
        if data:
            yield [b"\n".join(data)]


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
