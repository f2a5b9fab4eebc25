"""``/v1/chat/completions``, ``/v1/embeddings`` and ``/v1/responses``."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

from flm.core.errors import EngineError
from flm.core.models import EngineKind, ModelInfo
from flm.engines.base import EngineAdapter
from flm.openai.errors import HttpError, error_body, http_status
from flm.openai.sse import DONE, encode_event, usage_from_bytes
from flm.openai.translate import (
    ChatPlan,
    chat_target,
    check_embedding_input,
    completion_target,
    plan_chat,
    plan_completion,
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
    watch_disconnect,
)
from flm.proxy.runtime import ProxyRuntime
from flm.proxy.usage import estimate_tokens, model_not_allowed
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
    rt.metrics.record_tokens(state.engine_id or "", state.prompt_tokens, state.completion_tokens)


def refuse_cloud_model(state: RequestState, rt: ProxyRuntime, info: ModelInfo) -> NoReturn:
    """403 ``cloud_model_blocked``, recorded as a security event: the engine would send the
    prompt to a service on the internet and the policy does not allow cloud models."""
    if rt.audit is not None:
        rt.audit.event(
            "cloud_model_blocked",
            "medium",
            state.client_ip,
            {"engine_id": info.engine_id, "model": info.name},
            state.request_id,
        )
    raise HttpError(
        403,
        "cloud_model_blocked",
        f"{info.flm_id} runs on a remote service, not on this machine; set "
        '"allow_cloud_models": true in the security policy to serve it',
    )


async def _target(
    state: RequestState, rt: ProxyRuntime, named: str
) -> tuple[str, str, EngineAdapter, ModelInfo]:
    """Where a request for ``named`` goes: the engine, its model name, adapter and model
    details, after the key's model scope and the cloud-model rule. ``named`` (an flm:// id, a
    plain name or an alias) is what replies carry; the scope applies to the flm:// id it
    resolves to."""
    engine_id, model = await rt.engines.locate(named)
    state.engine_id, state.model = engine_id, named
    key = state.key
    if key is not None and key.models is not None and not key.allows(engine_id, model):
        raise model_not_allowed(engine_id, model)
    adapter, info = await rt.engines.resolve(engine_id, model)
    if info.cloud and not rt.effective.allow_cloud_models:
        refuse_cloud_model(state, rt, info)
    return engine_id, model, adapter, info


async def _prepare_chat(
    state: RequestState, rt: ProxyRuntime, body: Any, api_id: str = "chat_completions"
) -> tuple[ChatPlan, Any]:
    named = chat_target(body)
    engine_id, model, adapter, info = await _target(state, rt, named)
    changed = False
    if rt.profiles:  # defaults saved for this engine + model fill what the request left out
        changed = apply_profile(
            body, rt.profiles.get((engine_id, model)) or rt.profiles.get((engine_id, info.name))
        )
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


async def chat_completions(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    state: RequestState = scope["flm"]
    raw = await read_body(receive, scope, rt.settings.max_body_bytes)
    body = parse_json(raw)
    plan, adapter = await _prepare_chat(state, rt, body)
    public: str = body["model"]  # checked by _prepare_chat
    if plan.stream:
        strip = False
        if state.key is not None and adapter.endpoint.kind != EngineKind.OLLAMA:
            # Usage is accounted per key: ask the engine for it, and take the chunk out
            # again when the client did not ask (Ollama's adapter reports it either way).
            options = plan.body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                plan.body["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
                strip = True
        await stream_events(
            scope,
            receive,
            send,
            rt,
            adapter.chat_stream(plan.body, public),
            strip_usage=strip,
            prompt=lambda: _messages_text(body),
        )
        return
    forward = raw_with_model(raw, public, plan.model) if plan.unchanged else None
    reply = await _engine_call(adapter.chat_bytes(plan.body, public, forward), scope, receive)
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
            parts += [
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            ]
    return "\n".join(parts)


def _estimate_reply(state: RequestState, body: Any, reply: bytes) -> None:
    """Token counts estimated from the text, for an engine whose reply reports none."""
    try:
        data = json.loads(reply)
        text = "".join(
            str(((c or {}).get("message") or {}).get("content") or "")
            for c in data.get("choices") or ()
        )
    except (ValueError, AttributeError, TypeError):
        text = ""
    state.prompt_tokens = estimate_tokens(_messages_text(body))
    state.completion_tokens = estimate_tokens(text)
    state.usage_estimated = True


async def completions(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    """``/v1/completions``: legacy text completions, plain and streamed. OpenAI-compatible
    engines get the request as it is (model name swapped); Ollama through ``/api/generate``."""
    state: RequestState = scope["flm"]
    raw = await read_body(receive, scope, rt.settings.max_body_bytes)
    body = parse_json(raw)
    named = completion_target(body)
    engine_id, model, adapter, info = await _target(state, rt, named)
    changed = bool(rt.profiles) and apply_profile(
        body, rt.profiles.get((engine_id, model)) or rt.profiles.get((engine_id, info.name))
    )
    payload, warnings = plan_completion(body, model, rt.engines.capabilities(engine_id, info))
    state.warnings.extend(warnings)
    if payload.get("stream") is True:
        prompt = body["prompt"]
        await stream_events(
            scope,
            receive,
            send,
            rt,
            adapter.completion_stream(payload, named),
            prompt=lambda: prompt if isinstance(prompt, str) else "",
        )
        return
    forward = (
        raw_with_model(raw, named, model)
        if not changed and not warnings and payload.keys() == body.keys()
        else None
    )
    reply = await _engine_call(adapter.completion_bytes(payload, named, forward), scope, receive)
    await send_bytes(send, 200, reply)
    usage = usage_from_bytes(reply)
    if usage is None:
        prompt = body["prompt"]
        state.prompt_tokens = estimate_tokens(prompt if isinstance(prompt, str) else "")
        state.completion_tokens = 0
        state.usage_estimated = True
    else:
        _record_usage(state, usage, rt)


async def _engine_call(coro: Any, scope: Scope, receive: Receive) -> Any:
    """``coro``'s result, engine errors as HTTP errors; a client that leaves meanwhile cancels
    it (the engine stops at once, as for streams). FLM's own time (the ``overhead`` metric) is
    the time the request took to get here."""
    state: RequestState = scope["flm"]
    state.overhead_s = time.perf_counter() - state.started
    try:
        with watch_disconnect(scope, receive):
            return await coro
    except EngineError as exc:
        raise HttpError.from_flm(exc) from exc


async def stream_events(
    scope: Scope,
    receive: Receive,
    send: Send,
    rt: ProxyRuntime,
    events: AsyncIterator[bytes],
    *,
    strip_usage: bool = False,
    prompt: Callable[[], str] | None = None,
) -> None:
    """Forward SSE events as they arrive. Failures before the first event are ordinary HTTP
    errors; after it, one error event and ``[DONE]``. A client that goes away cancels the
    upstream request at once: the server's disconnect hook (see :class:`watch_disconnect`)
    cancels this task, which closes the engine connection through the adapter's ``finally``.

    ``strip_usage``: FLM asked the engine for usage the client did not ask for; the usage
    chunk is taken out of the stream. ``prompt``: the prompt's text, for an estimate when the
    engine reports no usage."""
    state = state_of(scope)
    state.streaming = True
    metrics = rt.metrics
    tap = _UsageTap(events, state, rt, strip_usage)
    watch = watch_disconnect(scope, receive)
    watch.start()
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
            await send(
                {
                    "type": "http.response.body",
                    "body": encode_event(json.dumps(failure).encode()) + DONE,
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not watch.gone:
            raise  # the server is shutting down
        state.error_code = "client_disconnected"
        current = asyncio.current_task()
        assert current is not None
        current.uncancel()
    finally:
        watch.stop()
        metrics.active_streams.dec()
        await tap.aclose()
        if (
            not tap.usage_seen
            and state.key is not None
            and state.prompt_tokens is None
            and state.completion_tokens is None
        ):
            state.prompt_tokens = estimate_tokens(prompt()) if prompt is not None else 0
            state.completion_tokens = tap.content_chunks  # (about one token a chunk)
            state.usage_estimated = True


def _note_stream_usage(batch: bytes, state: RequestState, rt: ProxyRuntime) -> None:
    _record_usage(state, usage_from_bytes(batch), rt)


#: Compact JSON with non-ASCII kept, the way engines write their chunks (one encoder: each
#: ``json.dumps`` call with options builds a new one).
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def strip_usage(batch: bytes) -> bytes:
    """``batch`` without what FLM's ``include_usage`` added: the usage-only chunk (no
    choices) is dropped, and a ``usage`` member on other chunks removed. Only the events that
    name ``usage`` are looked at (a read can hold a whole stream)."""
    at = batch.find(b'"usage":')
    if at < 0:
        return batch
    out: list[bytes] = []
    copied = 0  # (what of the batch is in ``out`` already)
    while at >= 0:
        begin = batch.rfind(b"\n\n", 0, at)
        begin = 0 if begin < 0 else begin + 2
        end = batch.find(b"\n\n", at)
        end = len(batch) if end < 0 else end
        event = batch[begin:end]
        after = end  # (where the copy resumes: the event's separator stays)
        if event.startswith(b"data: {"):
            try:
                chunk = json.loads(event[6:])
            except ValueError:
                chunk = None
            if isinstance(chunk, dict) and "usage" in chunk:
                if chunk.get("choices"):
                    out.append(batch[copied:begin])
                    del chunk["usage"]
                    out.append(b"data: " + _COMPACT(chunk).encode())
                elif end < len(batch):  # the usage-only chunk goes, with its separator
                    out.append(batch[copied:begin])
                    after = end + 2
                else:  # (the last event, unterminated: the separator before it goes)
                    out.append(batch[copied : max(copied, begin - 2)])
                copied = after
        at = batch.find(b'"usage":', end)
    out.append(batch[copied:])
    return b"".join(out)


class _UsageTap:
    """Wraps an event iterator to remember the usage the stream reports (in its last data
    event, for every engine FLM supports)."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        state: RequestState,
        rt: ProxyRuntime,
        strip: bool = False,
    ) -> None:
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
    named, payload = plan_embeddings(body)
    engine_id, model, adapter, _info = await _target(state, rt, named)
    payload["model"] = model
    if not adapter.capabilities().embeddings:
        raise HttpError(422, "unsupported_modalities", f"{engine_id} does not embed")
    check_embedding_input(payload, adapter.capabilities())
    reply = await _engine_call(adapter.embeddings(payload), scope, receive)
    reply["model"] = state.model
    _record_usage(state, reply.get("usage"), rt)
    await send_json(send, 200, reply)


def _function_call_item(call: dict[str, Any]) -> dict[str, Any]:
    """A chat tool call as a Responses ``function_call`` output item."""
    fn = call.get("function") or {}
    return {
        "type": "function_call",
        "id": f"fc_{secrets.token_hex(12)}",
        "call_id": str(call.get("id") or f"call_{secrets.token_hex(8)}"),
        "name": str(fn.get("name") or ""),
        "arguments": str(fn.get("arguments") or ""),
        "status": "completed",
    }


def _response_object(
    reply: dict[str, Any],
    public: str,
    resp_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
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
        output.append(
            {
                "type": "message",
                "id": f"msg_{secrets.token_hex(12)}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        )
    output += [_function_call_item(c) for c in calls]
    return {
        "id": resp_id or f"resp_{secrets.token_hex(24)}",
        "object": "response",
        "created_at": int(time.time()),
        "model": public,
        **(extra or {}),
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "output": output,
        "usage": {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _sse(kind: str, payload: dict[str, Any], seq: list[int]) -> bytes:
    seq[0] += 1
    data = json.dumps(
        {"type": kind, "sequence_number": seq[0], **payload},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return f"event: {kind}\ndata: {data}\n\n".encode()


async def _response_events(
    chunks: AsyncIterator[bytes],
    public: str,
    resp_id: str | None = None,
    extra: dict[str, Any] | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[bytes]:
    """Chat chunks → the Responses API's semantic stream events: the text as it comes, and
    function calls (gathered from their deltas) as whole items before the end. Nothing is
    sent before the engine's first chunk, so an engine that fails at once is an ordinary
    HTTP error, as for chat completions."""
    response: dict[str, Any] = {
        "id": resp_id or f"resp_{secrets.token_hex(24)}",
        "object": "response",
        "created_at": int(time.time()),
        "model": public,
        **(extra or {}),
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }
    item_id = f"msg_{secrets.token_hex(12)}"
    item: dict[str, Any] = {
        "type": "message",
        "id": item_id,
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    seq = [-1]
    text: list[str] = []
    usage: dict[str, Any] = {}
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    first = await anext(chunks, b"")  # (the engine's failure to start surfaces here)
    opening = (
        _sse("response.created", {"response": response}, seq)
        + _sse("response.in_progress", {"response": response}, seq)
        + _sse("response.output_item.added", {"output_index": 0, "item": item}, seq)
        + _sse(
            "response.content_part.added",
            {**where, "part": {"type": "output_text", "text": "", "annotations": []}},
            seq,
        )
    )

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
                        out.append(
                            _sse("response.output_text.delta", {**where, "delta": delta}, seq)
                        )
                    for tc in (choice.get("delta") or {}).get("tool_calls") or []:
                        if not isinstance(tc, dict):
                            continue
                        call = calls.setdefault(
                            int(tc.get("index") or 0),
                            {"id": None, "function": {"name": "", "arguments": ""}},
                        )
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
    final = {
        **response,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": [done_item, *items],
        "usage": {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    closing = [
        _sse("response.output_text.done", {**where, "text": full}, seq),
        _sse("response.content_part.done", {**where, "part": part}, seq),
        _sse("response.output_item.done", {"output_index": 0, "item": done_item}, seq),
    ]
    for index, fc in enumerate(items, 1):
        added = {**fc, "status": "in_progress", "arguments": ""}
        closing += [
            _sse("response.output_item.added", {"output_index": index, "item": added}, seq),
            _sse(
                "response.function_call_arguments.delta",
                {"item_id": fc["id"], "output_index": index, "delta": fc["arguments"]},
                seq,
            ),
            _sse(
                "response.function_call_arguments.done",
                {"item_id": fc["id"], "output_index": index, "arguments": fc["arguments"]},
                seq,
            ),
            _sse("response.output_item.done", {"output_index": index, "item": fc}, seq),
        ]
    closing.append(
        _sse(
            "response.completed" if not incomplete else "response.incomplete",
            {"response": final},
            seq,
        )
    )
    if on_done is not None:
        on_done(final)
    yield b"".join(closing)


def _input_items(value: Any) -> list[dict[str, Any]]:
    """A Responses request's ``input`` as the items ``input_items`` lists (each with an id)."""
    if isinstance(value, str):
        value = [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        ]
    items = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict):
            entry = {"type": "message", **item}
            if isinstance(entry.get("content"), str) and entry["type"] == "message":
                entry["content"] = [{"type": "input_text", "text": entry["content"]}]
            entry.setdefault(
                "id", f"{'msg' if entry['type'] == 'message' else 'item'}_{secrets.token_hex(12)}"
            )
            items.append(entry)
    return items


def _assistant_turn(output: list[dict[str, Any]]) -> dict[str, Any]:
    """A response's output items as the chat assistant message a follow-up replays."""
    text = "".join(
        part.get("text") or ""
        for item in output
        if item.get("type") == "message"
        for part in item.get("content") or []
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item.get("type") == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message


async def responses(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    body = await _body(scope, receive, rt)
    state = state_of(scope)
    chat = responses_to_chat(body)
    store = body.get("store") is not False  # (OpenAI stores unless told not to)
    previous = body.get("previous_response_id")
    history: list[dict[str, Any]] = []
    if previous is not None:
        hit = rt.responses.get(state.api_key_id, previous) if isinstance(previous, str) else None
        if hit is None:
            raise HttpError(
                400,
                "previous_response_not_found",
                f"previous_response_id: no stored response {str(previous)[:100]!r}",
            )
        history = hit.messages
    lead = 1 if isinstance(body.get("instructions"), str) else 0
    turn = chat["messages"][lead:]
    if history:
        chat["messages"] = chat["messages"][:lead] + history + turn
    plan, adapter = await _prepare_chat(state, rt, chat, "responses")
    public: str = chat["model"]
    resp_id = f"resp_{secrets.token_hex(24)}"
    extra = {
        "previous_response_id": previous,
        "store": store,
        "instructions": body.get("instructions"),
    }
    owner = state.api_key_id

    def keep(response: dict[str, Any]) -> None:
        if store:
            rt.responses.put(
                owner,
                response,
                _input_items(body.get("input")),
                [*history, *turn, _assistant_turn(response["output"])],
            )

    if plan.stream:
        if "stream_options" not in plan.body:
            plan.body["stream_options"] = {"include_usage": True}
        await stream_events(
            scope,
            receive,
            send,
            rt,
            _response_events(adapter.chat_stream(plan.body, public), public, resp_id, extra, keep),
            prompt=lambda: _messages_text(chat),
        )
        return
    reply = await _engine_call(adapter.chat(plan.body), scope, receive)
    if isinstance(reply.get("usage"), dict):
        _record_usage(state, reply.get("usage"), rt)
    else:
        _estimate_reply(state, chat, json.dumps(reply).encode())
    response = _response_object(reply, public, resp_id, extra)
    keep(response)
    await send_json(send, 200, response)


async def stored_response(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    """``GET``/``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``:
    only the key that created a response sees it; for any other it does not exist."""
    state = state_of(scope)
    rest = scope["path"][len("/v1/responses/") :]
    resp_id, _, sub = rest.partition("/")
    method = scope["method"]
    allowed = "GET" if sub else "GET, DELETE"
    if sub not in ("", "input_items") or "/" in sub:
        raise HttpError(404, "not_found", f"FLM does not serve {scope['path'][:100]}")
    if method not in allowed.split(", "):
        raise HttpError(
            405, "method_not_allowed", f"{method} not allowed here", [(b"allow", allowed.encode())]
        )
    state.route = "/v1/responses/{id}" + ("/input_items" if sub else "")
    hit = rt.responses.get(state.api_key_id, resp_id)
    if hit is None:
        raise HttpError(404, "not_found", f"no stored response {resp_id[:100]!r}")
    if method == "DELETE":
        rt.responses.delete(state.api_key_id, resp_id)
        await send_json(send, 200, {"id": resp_id, "object": "response", "deleted": True})
        return
    if not sub:
        await send_json(send, 200, hit.response)
        return
    await send_json(send, 200, _item_page(hit.input_items, scope))


def _item_page(items: list[dict[str, Any]], scope: Scope) -> dict[str, Any]:
    """One page of input items: ``order`` (``desc`` by default, as OpenAI), ``limit``
    (1-100, default 20) and ``after`` (an item id) from the query string."""
    from urllib.parse import parse_qs

    query = parse_qs(bytes(scope.get("query_string") or b"").decode("latin-1"))
    order = (query.get("order") or ["desc"])[0]
    if order not in ("asc", "desc"):
        raise HttpError(400, "invalid_request", "order must be asc or desc")
    try:
        limit = int((query.get("limit") or ["20"])[0])
    except ValueError:
        raise HttpError(400, "invalid_request", "limit must be an integer") from None
    if not 1 <= limit <= 100:
        raise HttpError(400, "invalid_request", "limit must be between 1 and 100")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after:
        ids = [i.get("id") for i in ordered]
        ordered = ordered[ids.index(after[0]) + 1 :] if after[0] in ids else []
    page = ordered[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > limit,
    }
