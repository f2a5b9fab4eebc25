"""``/engine/{id}/{path}``: the engine's native API, same auth, admin routes refused.

The target host is always the registered engine's; the request only chooses the path, which
is checked on its raw (undecoded) form so encoded traversal cannot slip through.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from flm.core.errors import EngineError
from flm.core.models import EngineKind
from flm.openai.errors import HttpError
from flm.proxy.asgi import Receive, Scope, Send, read_body
from flm.proxy.runtime import ProxyRuntime

#: Routes that change what an engine has installed or how it runs: never through FLM.
ADMIN_ROUTES: dict[EngineKind, re.Pattern[str]] = {
    EngineKind.OLLAMA: re.compile(r"^/api/(pull|push|create|delete|copy|blobs)(/|$)"),
    EngineKind.VLLM: re.compile(
        r"^/(v1/(load|unload)_lora_adapter|start_profile|stop_profile|reset_prefix_cache"
        r"|reset_mm_cache|sleep|wake_up|is_sleeping|collective_rpc|scale_elastic_ep"
        r"|update_weights|server_info|pause|resume)(/|$)"
    ),
    EngineKind.LLAMACPP: re.compile(r"^/(slots|lora-adapters|models/(load|unload))(/|$)"),
    EngineKind.LMSTUDIO: re.compile(r"^/api/v[01]/models/(load|unload|download)(/|$)"),
}
#: llama.cpp's /props accepts POST to change server settings.
_READ_ONLY = {EngineKind.LLAMACPP: re.compile(r"^/props$")}

_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
               b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
               b"authorization", b"cookie", b"x-forwarded-for", b"x-real-ip",
               b"x-forwarded-host", b"x-forwarded-proto", b"forwarded",
               b"accept-encoding"}
_RESPONSE_DROP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
                  b"set-cookie", b"server", b"date"}
_BAD_RAW = re.compile(rb"%2e|%2f|%5c|%00|\\|//|/\./|/\.\./|/\.\.?$", re.IGNORECASE)
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")


def split_target(scope: Scope) -> tuple[str, str]:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    if _BAD_RAW.search(raw):
        raise HttpError(404, "not_found", "no such route")
    path = unquote(raw.decode("latin-1"))
    match = re.match(r"^/engine/([a-z0-9][a-z0-9_-]{0,63})(/.*)$", path)
    if match is None or not _SAFE_PATH.match(match[2]):
        raise HttpError(404, "not_found", "no such route")
    segments = match[2].split("/")
    if ".." in segments or "." in segments:
        raise HttpError(404, "not_found", "no such route")
    return match[1], match[2]


async def engine_passthrough(scope: Scope, receive: Receive, send: Send,
                             rt: ProxyRuntime) -> None:
    engine_id, path = split_target(scope)
    adapter = rt.engines.adapter(engine_id)
    kind = adapter.endpoint.kind
    lowered = path.lower()
    admin = ADMIN_ROUTES.get(kind)
    if admin is not None and admin.match(lowered):
        raise HttpError(403, "route_disabled",
                        f"{kind.value} admin route {path} is not reachable through FLM")
    read_only = _READ_ONLY.get(kind)
    if read_only is not None and read_only.match(lowered) and scope["method"] != "GET":
        raise HttpError(403, "route_disabled", f"{path} is read-only through FLM")
    body = await read_body(receive, scope, rt.settings.max_body_bytes)
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
               if k not in _HOP_BY_HOP}
    query = scope.get("query_string", b"").decode("latin-1")
    target = path + (f"?{query}" if query else "")
    try:
        upstream = await adapter.client.request(scope["method"], target, data=body or None,
                                                headers=headers, check_status=False)
    except EngineError as exc:
        raise HttpError.from_flm(exc) from exc
    out_headers = [(k.lower(), v) for k, v in upstream.headers.raw()
                   if k.lower() not in _RESPONSE_DROP]
    await send({"type": "http.response.start", "status": upstream.status,
                "headers": out_headers})
    finished = False
    try:
        async for chunk in upstream.iter_chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finished = True
    except EngineError:
        pass  # headers are out; the client sees the body end early
    finally:
        upstream.finish(finished)
    await send({"type": "http.response.body", "body": b"", "more_body": False})
