"""``/engine/{id}/{path}``: the engine's native API, same auth, admin routes refused.

The target host is always the registered engine's; the request only chooses the path, which
is checked on its raw (undecoded) form so encoded traversal cannot slip through.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from flm.core.errors import EngineError
from flm.engines import kinds
from flm.openai.errors import HttpError, NoSuchRoute
from flm.proxy.asgi import Receive, RequestState, Scope, Send, read_body, watch_disconnect
from flm.proxy.runtime import ProxyRuntime
from flm.proxy.usage import require_engine

# Which routes of a kind are forwarded is the kind's descriptor's to say
# (flm.engines.kinds.PassThrough): routes that change what an engine has installed or how it
# runs, or act on the engine's accounts, never are; a kind that lists none forwards nothing.

#: Never sent on to the engine: hop-by-hop headers (RFC 9110 §7.6.1, with the old
#: Proxy-Connection), the client's credentials and addressing, and encodings FLM would have to
#: undo. Headers the client names in its Connection header are dropped too.
_REQUEST_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"authorization",
        b"cookie",
        b"x-forwarded-for",
        b"x-real-ip",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"forwarded",
        b"accept-encoding",
        # (asking a server behind FLM for another method or path than the one FLM checked)
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-original-url",
        b"x-rewrite-url",
    }
)
#: Never passed back to the client: hop-by-hop headers, cookies, and every header the gateway
#: sets itself (request id, security headers, HSTS): an engine's copy would come first and be
#: the one clients obey. CORS headers (``access-control-*``) are the gateway's policy alone.
#: Headers the engine names in its Connection header are dropped too.
_RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"set-cookie",
        b"server",
        b"date",
        b"x-request-id",
        b"x-flm-proxy",
        b"x-content-type-options",
        b"x-frame-options",
        b"referrer-policy",
        b"strict-transport-security",
    }
)
#: Methods the pass-through forwards (CONNECT and TRACE are not an engine API's).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _forwardable(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes], *, underscores: bool = True
) -> list[tuple[bytes, bytes]]:
    """``headers`` (names lower-cased) without ``drop``, ``access-control-*``, the names
    listed in a Connection header and, unless ``underscores``, names with an underscore
    (which a server behind may read as the same name with a hyphen)."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() in (b"connection", b"proxy-connection")
        for token in value.split(b",")
    }
    out = []
    for name, value in headers:
        low = name.lower()
        if (
            low in drop
            or low in named
            or low.startswith(b"access-control-")
            or (not underscores and b"_" in low)
        ):
            continue
        out.append((low, value))
    return out


_BAD_RAW = re.compile(rb"%2e|%2f|%5c|%00|\\|//|/\./|/\.\./|/\.\.?$", re.IGNORECASE)
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")


def split_target(scope: Scope) -> tuple[str, str]:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    if _BAD_RAW.search(raw):
        raise NoSuchRoute()
    path = unquote(raw.decode("latin-1"))
    match = re.match(r"^/engine/([a-z0-9][a-z0-9_-]{0,63})(/.*)$", path)
    if match is None or not _SAFE_PATH.match(match[2]):
        raise NoSuchRoute()
    segments = match[2].split("/")
    if ".." in segments or "." in segments:
        raise NoSuchRoute()
    return match[1], match[2]


async def engine_passthrough(scope: Scope, receive: Receive, send: Send, rt: ProxyRuntime) -> None:
    engine_id, path = split_target(scope)
    method: str = scope["method"]
    if method not in _METHODS:
        raise HttpError(
            405,
            "method_not_allowed",
            f"{method} is not forwarded to engines",
            [(b"allow", ", ".join(sorted(_METHODS)).encode())],
        )
    state: RequestState = scope["flm"]
    if state.key is not None:
        require_engine(state, engine_id)
    adapter = await rt.engines.detected_adapter(engine_id)
    state.engine_id = engine_id
    kind = adapter.endpoint.kind
    descriptor = kinds.find(kind)
    refusal = "not-allowed" if descriptor is None else descriptor.passthrough_refusal(path, method)
    if refusal == "admin":
        raise HttpError(
            403, "route_disabled", f"{kind} admin route {path} is not reachable through FLM"
        )
    if refusal == "read-only":
        raise HttpError(403, "route_disabled", f"{path} is read-only through FLM")
    if refusal is not None:
        raise HttpError(403, "route_disabled", f"{kind} route {path} is not reachable through FLM")
    body = await read_body(receive, scope, rt.settings.max_body_bytes)
    headers = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in _forwardable(scope["headers"], _REQUEST_DROP, underscores=False)
    }
    query = scope.get("query_string", b"").decode("latin-1")
    target = path + (f"?{query}" if query else "")
    try:
        with watch_disconnect(scope, receive):
            upstream = await adapter.client.request(
                method, target, data=body or None, headers=headers, check_status=False
            )
    except EngineError:
        # (one text for every way of not getting an answer: refused, closed, garbage, timed
        # out; the details would tell a key holder what listens on the engine's port)
        raise HttpError(503, "engine_unavailable", f"engine {engine_id!r} did not answer") from None
    out_headers = _forwardable(upstream.headers.raw(), _RESPONSE_DROP)
    await send({"type": "http.response.start", "status": upstream.status, "headers": out_headers})
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
