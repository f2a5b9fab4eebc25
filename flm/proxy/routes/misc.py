"""Models, health, metrics, and the routes FLM answers without an engine."""

from __future__ import annotations

from typing import Any

from flm.core.keyscope import KeyScope
from flm.core.models import make_model_id
from flm.openai.errors import HttpError
from flm.proxy.asgi import Receive, Scope, Send, read_body, send_bytes, send_json
from flm.proxy.runtime import ProxyRuntime

MAX_AUDIO_BYTES = 25 * 1024 * 1024


def _scope_of(scope: Scope) -> KeyScope | None:
    key: KeyScope | None = scope["flm"].key
    return key if key is not None and key.models is not None else None


async def _model_cards(rt: ProxyRuntime, key: KeyScope | None) -> list[dict[str, Any]]:
    """Every model as ``flm://engine/model``, then plain names exactly one engine serves, then
    aliases (an alias shadows a plain name of the same spelling), each callable as listed. A
    key limited to some models sees only those (a name or alias: by the id it stands for);
    cloud models are left out unless the policy allows them."""
    listed = sorted(await rt.engines.all_models(), key=lambda m: m.flm_id)
    if not rt.effective.allow_cloud_models:
        hidden = {m.flm_id for m in listed if m.cloud}
        listed = [m for m in listed if not m.cloud]
    else:
        hidden = set()
    by_id = {m.flm_id: m for m in listed}
    cards = [
        _card(m.flm_id, m.engine_id, m.context_length)
        for m in listed
        if key is None or key.allows_model(m.flm_id)
    ]
    aliases = rt.engines.aliases
    for name, engine_id in sorted(rt.engines.plain_names().items()):
        target = make_model_id(engine_id, name)
        if (
            name not in aliases
            and target not in hidden
            and (key is None or key.allows_model(target))
        ):
            info = by_id.get(target)
            cards.append(_card(name, engine_id, info.context_length if info else None, target))
    for name, (engine_id, model) in sorted(aliases.items()):
        target = make_model_id(engine_id, model)
        if target not in hidden and (key is None or key.allows_model(target)):
            info = by_id.get(target)
            cards.append(_card(name, engine_id, info.context_length if info else None, target))
    return cards


def _card(
    model_id: str, engine_id: str, context: int | None, target: str | None = None
) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": engine_id,
        "context_length": context,
    }
    if target is not None:
        card["flm_id"] = target  # what a plain name or an alias stands for
    return card


async def models(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    data = await _model_cards(rt, _scope_of(scope))
    await send_json(send, 200, {"object": "list", "data": data})


async def model(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    """``GET /v1/models/{id}``: one model, as OpenAI's "retrieve model" returns it."""
    wanted = scope["path"][len("/v1/models/") :]
    for card in await _model_cards(rt, _scope_of(scope)):
        if card["id"] == wanted:
            await send_json(send, 200, card)
            return
    raise HttpError(404, "model_not_found", f"no model {wanted[:200]!r}")


async def health(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    await send_json(send, 200, {"status": "ok"})


async def metrics(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    from flm.proxy.health import ensure_engine_watch

    ensure_engine_watch(rt)  # (started at proxy start too; here for embedded gateways)
    await send_bytes(
        send,
        200,
        rt.metrics.render(),
        [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
    )


async def transcriptions(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    ctype = b""
    for key, value in scope["headers"]:
        if key == b"content-type":
            ctype = bytes(value)
    if not ctype.startswith(b"multipart/form-data"):
        raise HttpError(400, "invalid_request", "send multipart/form-data with 'file' and 'model'")
    await read_body(receive, scope, MAX_AUDIO_BYTES + 64 * 1024)
    raise HttpError(
        422, "unsupported_modalities", "no registered engine accepts audio input (audio_inputs)"
    )


async def images(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    raise HttpError(501, "not_implemented", "no registered engine generates images")


async def speech(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    raise HttpError(404, "route_disabled", "no registered engine produces audio output")
