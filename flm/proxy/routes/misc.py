"""Models, health, metrics, and the routes FLM answers without an engine."""

from __future__ import annotations

from flm.core.keyscope import KeyScope
from flm.openai.errors import HttpError
from flm.proxy.asgi import Receive, Scope, Send, read_body, send_bytes, send_json
from flm.proxy.runtime import ProxyRuntime

MAX_AUDIO_BYTES = 25 * 1024 * 1024


def _scope_of(scope: Scope) -> KeyScope | None:
    key: KeyScope | None = scope["flm"].key
    return key if key is not None and key.models is not None else None


async def models(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    key = _scope_of(scope)  # a key limited to some models sees only those
    data = [
        {"id": m.flm_id, "object": "model", "created": 0, "owned_by": m.engine_id,
         "context_length": m.context_length}
        for m in sorted(await rt.engines.all_models(), key=lambda m: m.flm_id)
        if key is None or key.allows_model(m.flm_id)
    ]
    await send_json(send, 200, {"object": "list", "data": data})


async def model(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    """``GET /v1/models/{id}``: one model, as OpenAI's "retrieve model" returns it."""
    wanted = scope["path"][len("/v1/models/"):]
    key = _scope_of(scope)
    for m in await rt.engines.all_models():
        if m.flm_id == wanted and (key is None or key.allows_model(m.flm_id)):
            await send_json(send, 200, {"id": m.flm_id, "object": "model", "created": 0,
                                        "owned_by": m.engine_id,
                                        "context_length": m.context_length})
            return
    raise HttpError(404, "not_found", f"no model {wanted[:200]!r}")


async def health(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    await send_json(send, 200, {"status": "ok"})


async def metrics(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    await send_bytes(send, 200, rt.metrics.render(),
                     [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])


async def transcriptions(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    ctype = b""
    for key, value in scope["headers"]:
        if key == b"content-type":
            ctype = bytes(value)
    if not ctype.startswith(b"multipart/form-data"):
        raise HttpError(400, "invalid_request", "send multipart/form-data with 'file' and "
                        "'model'")
    await read_body(receive, scope, MAX_AUDIO_BYTES + 64 * 1024)
    raise HttpError(422, "unsupported_modalities",
                    "no registered engine accepts audio input (audio_inputs)")


async def images(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    raise HttpError(501, "not_implemented", "no registered engine generates images")


async def speech(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    raise HttpError(404, "route_disabled", "no registered engine produces audio output")
