"""``/v1/chat/completions``, ``/v1/embeddings`` and ``/v1/responses``."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from flm.core.errors import EngineError
from flm.core.models import EngineKind, make_model_id
from flm.openai.errors import HttpError, error_body, http_status
from flm.openai.sse import DONE, encode_event, usage_from_bytes
from flm.openai.translate import (
    ChatPlan,
    chat_target,
    plan_chat,
    plan_embeddings,
    raw_with_model,
    responses_to_chat,
)
from flm.proxy.asgi import (
    Receive,
    RequestState,
    Scope,
    Send,
    parse_json,
    read_body,
    read_json,
    send_bytes,
    send_json,
    state_of,
)
from flm.proxy.runtime import ProxyRuntime
from flm.proxy.usage import estimate_tokens, require_model
from flm.services.profiles import apply_profile, apply_prompt

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def _body(scope: Scope, receive: Receive, rt: ProxyRuntime) -> Any:
    return await read_json(receive, scope, rt.settings.max_body_bytes)


def _record_usage(state: RequestState, usage: Any, rt: ProxyRuntime) -> None:
    if not isinstance(usage, dict):
        return
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if isinstance(prompt, int):
        state.prompt_tokens = prompt
    if isinstance(completion, int):
        state.completion_tokens = completion
    rt.metrics.record_tokens(state.engine_id or "", state.prompt_tokens,
                             state.completion_tokens)


async def _prepare_chat(state: RequestState, rt: ProxyRuntime, body: Any,
                        api_id: str = "chat_completions") -> tuple[ChatPlan, Any]:
    engine_id, model = chat_target(body)
    # (the id the client sent, ``flm://engine/model``, which is also the one replies carry)
    state.engine_id, state.model = engine_id, body["model"]
    if state.key is not None and state.key.models is not None:
        require_model(state, make_model_id(engine_id, model))
    adapter, info = await rt.engines.resolve(engine_id, model)
    changed = False
    if rt.profiles:  # defaults saved for this engine + model fill what the request left out
        changed = apply_profile(body, rt.profiles.get((engine_id, model))
                                or rt.profiles.get((engine_id, info.name)))
    template = rt.prompts.get(api_id) if rt.prompts else None
    if template:
        messages = apply_prompt(body["messages"], template)
        if messages is not None:
            body["messages"] = messages
            changed = True
    plan = plan_chat(body, engine_id, model, rt.engines.capabilities(engine_id, info))
    if changed:
        plan.unchanged = False
    if plan.image_urls:
        from flm.proxy.images import inline_remote_images

        await inline_remote_images(plan, rt)
    state.warnings.extend(plan.warnings)
    return plan, adapter


async def chat_completions(scope: Scope, receive: Receive, send: Send,
                           rt: ProxyRuntime) -> None:
    state: RequestState = scope["flm"]
    raw = await read_body(receive, scope, rt.settings.max_body_bytes)
    body = parse_json(raw)
    plan, adapter = await _prepare_chat(state, rt, body)
    public: str = body["model"]  # checked by _prepare_chat: flm://engine/model
    if plan.stream:
        strip = False
        if state.key is not None and adapter.endpoint.kind != EngineKind.OLLAMA:
            # Usage is accounted per key: ask the engine for it, and take the chunk out
            # again when the client did not ask (Ollama's adapter reports it either way).
            options = plan.body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                plan.body["stream_options"] = {
                    **(options if isinstance(options, dict) else {}), "include_usage": True}
                strip = True
        await stream_events(scope, receive, send, rt, adapter.chat_stream(plan.body, public),
                            strip_usage=strip, prompt=lambda: _messages_text(body))
        return
    forward = raw_with_model(raw, public, plan.model) if plan.unchanged else None
    reply = await _engine_call(adapter.chat_bytes(plan.body, public, forward), state)
    await send_bytes(send, 200, reply)
    # Token counts are read from the reply once it is on its way to the client.
    usage = usage_from_bytes(reply)
    if usage is None:
        _estimate_reply(state, body, reply)
    else:
        _record_usage(state, usage, rt)


def _messages_text(body: Any) -> str:
    """The text of a chat request's messages (for estimating its tokens)."""
    parts: list[str] = []
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p["text"] for p in content
                      if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(parts)


def _estimate_reply(state: RequestState, body: Any, reply: bytes) -> None:
    """Token counts estimated from the text, for an engine whose reply reports none."""
    try:
        data = json.loads(reply)
        text = "".join(str(((c or {}).get("message") or {}).get("content") or "")
                       for c in data.get("choices") or ())
    except (ValueError, AttributeError, TypeError):
        text = ""
    state.prompt_tokens = estimate_tokens(_messages_text(body))
    state.completion_tokens = estimate_tokens(text)
    state.usage_estimated = True


async def _engine_call(coro: Any, state: RequestState) -> Any:
    """``coro``'s result, engine errors as HTTP errors. FLM's own time (the ``overhead``
    metric) is the time the request took to get here."""
    state.overhead_s = time.perf_counter() - state.started
    try:
        return await coro
    except EngineError as exc:
        raise HttpError.from_flm(exc) from exc


async def stream_events(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime,
                        events: AsyncIterator[bytes], *, strip_usage: bool = False,
                        prompt: Callable[[], str] | None = None) -> None:
    """Forward SSE events as they arrive. Failures before the first event are ordinary HTTP
    errors; after it, one error event and ``[DONE]``. A client that goes away cancels the
    upstream request at once: a watcher waits for ``http.disconnect`` and cancels this task,
    which closes the engine connection through the adapter's ``finally``.

    ``strip_usage``: FLM asked the engine for usage the client did not ask for; the usage
    chunk is taken out of the stream. ``prompt``: the prompt's text, for an estimate when the
    engine reports no usage."""
    state = state_of(scope)
    state.streaming = True
    metrics = rt.metrics
    tap = _UsageTap(events, state, rt, strip_usage)
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()

    watcher = asyncio.ensure_future(watch())
    metrics.active_streams.inc()
    try:
        try:
            first = await tap.__anext__()
        except StopAsyncIteration:
            raise HttpError(502, "engine_error", "engine sent an empty stream") from None
        except EngineError as exc:
            raise HttpError.from_flm(exc) from exc
        now = time.perf_counter()
        state.first_byte_at = now
        metrics.record_ttft(state.engine_id or "", now - state.started)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        try:
            async for event in tap:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        except EngineError as exc:
            status, code = http_status(exc)
            state.error_code = code
            failure = error_body(status, code, exc.message, state.request_id)
            await send({"type": "http.response.body",
                        "body": encode_event(json.dumps(failure).encode()) + DONE,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not gone:
            raise  # the server is shutting down
        state.error_code = "client_disconnected"
        current.uncancel()
    finally:
        watcher.cancel()
        metrics.active_streams.dec()
        await tap.aclose()
        if (not tap.usage_seen and state.key is not None and state.prompt_tokens is None
                and state.completion_tokens is None):
            state.prompt_tokens = estimate_tokens(prompt()) if prompt is not None else 0
            state.completion_tokens = tap.content_chunks  # (about one token a chunk)
            state.usage_estimated = True


def _note_stream_usage(batch: bytes, state: RequestState, rt: ProxyRuntime) -> None:
    _record_usage(state, usage_from_bytes(batch), rt)


def strip_usage(batch: bytes) -> bytes:
    """``batch`` without what FLM's ``include_usage`` added: the usage-only chunk (no
    choices) is dropped, and a ``usage`` member on other chunks removed."""
    out: list[bytes] = []
    for event in batch.split(b"\n\n"):
        if b'"usage":' in event and event.startswith(b"data: {"):
            try:
                chunk = json.loads(event[6:])
            except ValueError:
                out.append(event)
                continue
            if isinstance(chunk, dict) and "usage" in chunk:
                if not chunk.get("choices"):
                    continue
                del chunk["usage"]
                event = b"data: " + json.dumps(chunk, separators=(",", ":"),
                                               ensure_ascii=False).encode()
        out.append(event)
    return b"\n\n".join(out)


class _UsageTap:
    """Wraps an event iterator to remember the usage the stream reports (in its last data
    event, for every engine FLM supports)."""

    def __init__(self, events: AsyncIterator[bytes], state: RequestState,
                 rt: ProxyRuntime, strip: bool = False) -> None:
        self._events = events
        self._state = state
        self._rt = rt
        self._strip = strip
        self.usage_seen = False
        #: Events with text in them (for an estimate when no usage comes).
        self.content_chunks = 0

    def __aiter__(self) -> _UsageTap:
        return self

    async def __anext__(self) -> bytes:
        batch = await self._events.__anext__()
        if b'"usage":' in batch:
            if b'"usage":{' in batch:
                self.usage_seen = True
                _note_stream_usage(batch, self._state, self._rt)
            if self._strip:
                batch = strip_usage(batch)
        elif not self.usage_seen:
            self.content_chunks += batch.count(b'"content":"') - batch.count(b'"content":""')
        return batch

    async def aclose(self) -> None:
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


async def embeddings(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    state = state_of(scope)
    body = await _body(scope, receive, rt)
    engine_id, model, payload = plan_embeddings(body)
    state.engine_id, state.model = engine_id, make_model_id(engine_id, model)
    if state.key is not None and state.key.models is not None:
        require_model(state, state.model)
    adapter, _info = await rt.engines.resolve(engine_id, model)
    if not adapter.capabilities().embeddings:
        raise HttpError(422, "unsupported_modalities", f"{engine_id} does not embed")
    reply = await _engine_call(adapter.embeddings(payload), state)
    reply["model"] = state.model
    _record_usage(state, reply.get("usage"), rt)
    await send_json(send, 200, reply)


def _function_call_item(call: dict[str, Any]) -> dict[str, Any]:
    """A chat tool call as a Responses ``function_call`` output item."""
    fn = call.get("function") or {}
    return {"type": "function_call", "id": f"fc_{secrets.token_hex(12)}",
            "call_id": str(call.get("id") or f"call_{secrets.token_hex(8)}"),
            "name": str(fn.get("name") or ""), "arguments": str(fn.get("arguments") or ""),
            "status": "completed"}


def _response_object(reply: dict[str, Any], public: str) -> dict[str, Any]:
    choice = (reply.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") or ""
    usage = reply.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    incomplete = choice.get("finish_reason") == "length"
    output: list[dict[str, Any]] = []
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    if text or not calls:
        output.append({
            "type": "message", "id": f"msg_{secrets.token_hex(12)}", "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        })
    output += [_function_call_item(c) for c in calls]
    return {
        "id": f"resp_{secrets.token_hex(12)}",
        "object": "response",
        "created_at": int(time.time()),
        "model": public,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "output": output,
        "usage": {"input_tokens": prompt, "output_tokens": completion,
                  "total_tokens": prompt + completion},
    }


def _sse(kind: str, payload: dict[str, Any], seq: list[int]) -> bytes:
    seq[0] += 1
    data = json.dumps({"type": kind, "sequence_number": seq[0], **payload},
                      separators=(",", ":"), ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def _response_events(chunks: AsyncIterator[bytes], public: str) -> AsyncIterator[bytes]:
    """Chat chunks → the Responses API's semantic stream events: the text as it comes, and
    function calls (gathered from their deltas) as whole items before the end. Nothing is
    sent before the engine's first chunk, so an engine that fails at once is an ordinary
    HTTP error, as for chat completions."""
    response: dict[str, Any] = {
        "id": f"resp_{secrets.token_hex(12)}", "object": "response",
        "created_at": int(time.time()), "model": public, "status": "in_progress",
        "error": None, "incomplete_details": None, "output": [], "usage": None,
    }
    item_id = f"msg_{secrets.token_hex(12)}"
    item: dict[str, Any] = {"type": "message", "id": item_id, "status": "in_progress",
                            "role": "assistant", "content": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    seq = [-1]
    text: list[str] = []
    usage: dict[str, Any] = {}
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    first = await anext(chunks, b"")  # (the engine's failure to start surfaces here)
    opening = (_sse("response.created", {"response": response}, seq)
               + _sse("response.in_progress", {"response": response}, seq)
               + _sse("response.output_item.added", {"output_index": 0, "item": item}, seq)
               + _sse("response.content_part.added", {**where, "part": {
                   "type": "output_text", "text": "", "annotations": []}}, seq))

    async def batches() -> AsyncIterator[bytes]:
        if first:
            yield first
        async for batch in chunks:
            yield batch

    try:
        async for batch in batches():
            out: list[bytes] = [opening] if opening else []
            opening = b""
            for event in batch.split(b"\n\n"):
                if not event.startswith(b"data: ") or event == DONE.rstrip():
                    continue
                chunk = json.loads(event[6:])
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        text.append(delta)
                        out.append(_sse("response.output_text.delta",
                                        {**where, "delta": delta}, seq))
                    for tc in (choice.get("delta") or {}).get("tool_calls") or []:
                        if not isinstance(tc, dict):
                            continue
                        call = calls.setdefault(int(tc.get("index") or 0), {
                            "id": None, "function": {"name": "", "arguments": ""}})
                        call["id"] = call["id"] or tc.get("id")
                        fn = tc.get("function") or {}
                        call["function"]["name"] += fn.get("name") or ""
                        call["function"]["arguments"] += fn.get("arguments") or ""
                    finish = choice.get("finish_reason") or finish
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
            if out:
                yield b"".join(out)
        if opening:  # an empty stream: still a well-formed (empty) response
            yield opening
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    full = "".join(text)
    part = {"type": "output_text", "text": full, "annotations": []}
    done_item = {**item, "status": "completed", "content": [part]}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    incomplete = finish == "length"
    items = [_function_call_item(calls[i]) for i in sorted(calls)]
    final = {**response, "status": "incomplete" if incomplete else "completed",
             "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
             "output": [done_item, *items],
             "usage": {"input_tokens": prompt, "output_tokens": completion,
                       "total_tokens": prompt + completion}}
    closing = [_sse("response.output_text.done", {**where, "text": full}, seq),
               _sse("response.content_part.done", {**where, "part": part}, seq),
               _sse("response.output_item.done", {"output_index": 0, "item": done_item}, seq)]
    for index, fc in enumerate(items, 1):
        added = {**fc, "status": "in_progress", "arguments": ""}
        closing += [
            _sse("response.output_item.added", {"output_index": index, "item": added}, seq),
            _sse("response.function_call_arguments.delta", {
                "item_id": fc["id"], "output_index": index, "delta": fc["arguments"]}, seq),
            _sse("response.function_call_arguments.done", {
                "item_id": fc["id"], "output_index": index, "arguments": fc["arguments"]}, seq),
            _sse("response.output_item.done", {"output_index": index, "item": fc}, seq)]
    closing.append(_sse("response.completed" if not incomplete else "response.incomplete",
                        {"response": final}, seq))
    yield b"".join(closing)


async def responses(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    body = await _body(scope, receive, rt)
    chat = responses_to_chat(body)
    state = state_of(scope)
    plan, adapter = await _prepare_chat(state, rt, chat, "responses")
    public = make_model_id(plan.engine_id, plan.model)
    if plan.stream:
        if "stream_options" not in plan.body:
            plan.body["stream_options"] = {"include_usage": True}
        await stream_events(scope, receive, send, rt,
                            _response_events(adapter.chat_stream(plan.body, public), public),
                            prompt=lambda: _messages_text(chat))
        return
    reply = await _engine_call(adapter.chat(plan.body), state)
    if isinstance(reply.get("usage"), dict):
        _record_usage(state, reply.get("usage"), rt)
    else:
        _estimate_reply(state, chat, json.dumps(reply).encode())
    await send_json(send, 200, _response_object(reply, public))
