"""The outermost layer: request ids, the record of every outcome, the error contract."""

from __future__ import annotations

import logging
import time

from flm.core.errors import FlmError
from flm.core.ids import new_request_id
from flm.http.asgi import HEADER_LINES, header_pairs
from flm.openai.errors import HttpError, error_bytes
from flm.proxy.asgi import ASGIApp, Message, Receive, RequestState, Scope, Send
from flm.proxy.runtime import ProxyRuntime
from flm.proxy.usage import account

log = logging.getLogger("flm.proxy")

#: On every response of FLM's listeners (the server adds them, see
#: :func:`flm.proxy.app.response_headers`): lets detection recognise FLM's own listeners.
BASE_HEADERS = [
    (b"x-flm-proxy", b"1"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
#: On every response of an HTTPS listener (and its plain-HTTP redirect port).
HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")
#: Routes that wait for the audit only at twice its bound, so that an operator can still see
#: the condition (``/metrics``) while the audit is stuck.
_EXEMPT = frozenset({"/metrics", "/health", "/healthz"})


class RequestMiddleware:
    """The three outermost layers of :func:`flm.proxy.app.build_app`, as one middleware:

    1. request id — creates the request's shared state and stamps ``X-Request-Id`` on every
       response, errors included (the fixed security headers are the server's, see
       :func:`flm.proxy.app.response_headers`);
    2. observe/audit — records the outcome of every request, refusals included: metrics and
       one audit record (handed to the audit sink, never written here);
    3. errors — any failure below becomes the JSON error contract, or, once a response has
       started, a cut connection.
    """

    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # 1. request id
        client = scope.get("client")
        state = RequestState(new_request_id(), client[0] if client else "", time.perf_counter())
        scope["flm"] = state
        rid = state.request_id.encode()
        ready = scope.get(HEADER_LINES, False)

        async def stamped_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state.status = message["status"]
                if ready:  # the server takes FLM's own header lines as they are
                    message[HEADER_LINES] = b"x-request-id: %b\r\n%b" % (rid, state.key_lines)
                else:
                    message["headers"] = [
                        *message.get("headers", ()),
                        (b"x-request-id", rid),
                        *header_pairs(state.key_lines),
                    ]
                if state.warnings:
                    message["headers"] = [
                        *message.get("headers", ()),
                        (b"x-flm-warning", "; ".join(state.warnings).encode()),
                    ]
            await send(message)

        audit = self.runtime.audit
        if (
            audit is not None
            and audit.full()
            and not await audit.room(hard=scope["path"] in _EXEMPT)
        ):
            # Back-pressure: the audit cannot take this request's record. The request is
            # refused unanswered by any engine and counted (an ``audit_overload`` event);
            # it is not queued, which would defeat the bound.
            state.status = 503
            await _send_error(
                state,
                stamped_send,
                HttpError(
                    503,
                    "audit_unavailable",
                    "the audit trail cannot record requests right now; retry later",
                    headers=[(b"retry-after", b"1")],
                ),
            )
            self.runtime.metrics.record_request(state.route, 503, "", 0.0, None)
            return
        rt = self.runtime
        # (alone from start to end: the loop has time to spare for the request's record)
        alone = rt.in_flight == 0
        rt.in_flight += 1
        try:
            # 3. errors (the outcome recorded below is the status each error became)
            try:
                await self.app(scope, receive, stamped_send)
            except HttpError as exc:
                if state.status:  # a response has started: it can only be cut, not replaced
                    raise
                await _send_error(state, stamped_send, exc)
            except FlmError as exc:
                if state.status:
                    raise
                await _send_error(state, stamped_send, HttpError.from_flm(exc))
            except Exception:
                log.exception("unhandled error in request")
                if state.status:
                    raise
                await _send_error(
                    state, stamped_send, HttpError(500, "internal_error", "internal error")
                )
        finally:
            # 2. observe/audit
            rt.in_flight -= 1
            self._record(scope, state, alone and rt.in_flight == 0)

    def _record(self, scope: Scope, state: RequestState, spare: bool) -> None:
        rt = self.runtime
        elapsed = time.perf_counter() - state.started
        status = state.status or 500
        rt.metrics.record_request(
            state.route, status, state.engine_id or "", elapsed, state.overhead_s
        )
        now = time.time()
        if state.key is not None:
            account(rt, state, now)
        audit = rt.audit
        if audit is not None:
            audit.request(
                now,
                state.request_id,
                state.client_ip,
                state.api_key_id,
                scope["path"],
                scope["method"],
                state.engine_id,
                state.model,
                status,
                elapsed * 1000,
                state.prompt_tokens,
                state.completion_tokens,
                state.error_code,
                spare=spare,
            )


async def _send_error(state: RequestState, send: Send, exc: HttpError) -> None:
    state.error_code = exc.code
    body = error_bytes(exc.status, exc.code, exc.message, state.request_id)
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *exc.headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
