"""Error handling and request ids: the two outermost layers."""

from __future__ import annotations

import logging
import random
import secrets
import time

from flm.core.errors import FlmError
from flm.openai.errors import HttpError, error_bytes
from flm.proxy.asgi import ASGIApp, Message, Receive, RequestState, Scope, Send, state_of

log = logging.getLogger("flm.proxy")

#: Always on every response: lets detection recognise FLM's own listeners.
BASE_HEADERS = [
    (b"x-flm-proxy", b"1"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


# Request ids are correlation handles, not secrets: a PRNG seeded from the OS is enough and
# avoids a system call per request.
_ids = random.Random(secrets.randbits(64))  # noqa: S311 - ids are not secrets


def new_request_id() -> str:
    return f"{int(time.time() * 1000)}-{_ids.getrandbits(48):012x}"


class ErrorMiddleware:
    """Turns any escaped exception into the JSON error contract (or a mid-stream cut)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("flm_head_too_large"):
            await self._send_error(scope, send, HttpError(431, "headers_too_large",
                                                          "request headers too large"))
            return
        # The request-id layer (outside this one) records the status once a response has
        # started; after that an error can only cut the response, not replace it.
        try:
            await self.app(scope, receive, send)
        except HttpError as exc:
            if scope["flm"].status:
                raise
            await self._send_error(scope, send, exc)
        except FlmError as exc:
            if scope["flm"].status:
                raise
            await self._send_error(scope, send, HttpError.from_flm(exc))
        except Exception:
            log.exception("unhandled error in request")
            if scope["flm"].status:
                raise
            await self._send_error(scope, send, HttpError(500, "internal_error",
                                                          "internal error"))

    @staticmethod
    async def _send_error(scope: Scope, send: Send, exc: HttpError) -> None:
        state = scope.get("flm")
        request_id = state.request_id if isinstance(state, RequestState) else new_request_id()
        if isinstance(state, RequestState):
            state.error_code = exc.code
        body = error_bytes(exc.status, exc.code, exc.message, request_id)
        await send({"type": "http.response.start", "status": exc.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *exc.headers]})
        await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Creates the request's shared state and stamps ``X-Request-Id`` (and the base security
    headers) on every response, errors included."""

    def __init__(self, app: ASGIApp, *, hsts: bool = False) -> None:
        self.app = app
        self.extra = list(BASE_HEADERS)
        if hsts:
            self.extra.append((b"strict-transport-security",
                               b"max-age=31536000; includeSubDomains"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        state = RequestState(new_request_id(), client[0] if client else "",
                             time.perf_counter())
        scope["flm"] = state
        rid = state.request_id.encode()
        extra = self.extra

        async def stamped_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state.status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid),
                                      *extra]
                if state.warnings:
                    message["headers"].append(
                        (b"x-flm-warning", "; ".join(state.warnings).encode()))
            await send(message)

        await self.app(scope, receive, stamped_send)


def request_state(scope: Scope) -> RequestState:
    return state_of(scope)
