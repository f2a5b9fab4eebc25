"""Authentication: ``Authorization: Bearer <key>`` on every route but ``/health`` (and
``/metrics`` on a loopback-only proxy). Keys in query strings are never looked at."""

from __future__ import annotations

from flm.openai.errors import HttpError
from flm.proxy.asgi import ASGIApp, Receive, Scope, Send, header_values, state_of
from flm.proxy.runtime import ProxyRuntime

_CHALLENGE = [(b"www-authenticate", b'Bearer realm="flm"')]
MAX_KEY_LENGTH = 256


def public_path(path: str, runtime: ProxyRuntime) -> bool:
    if path == "/health":
        return True
    return path == "/metrics" and runtime.settings.loopback_only


class AuthMiddleware:
    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime

    def _fail(self, scope: Scope, message: str) -> HttpError:
        rt = self.runtime
        rt.metrics.auth_failures.inc()
        state = state_of(scope)
        ip = state.client_ip
        count, block = rt.guard.auth_failure(ip, rt.effective)
        if rt.audit is not None:
            rt.audit.event("auth_failure", "medium" if block else "low", ip,
                           {"failures": count, "reason": message}, state.request_id,
                           scope["path"])
            if block is not None:
                rt.audit.block(ip, block.reason, block.since, block.until, count)
                rt.audit.event("ip_blocked", "high", ip,
                               {"reason": block.reason, "failures": count,
                                "permanent": block.permanent}, state.request_id)
        return HttpError(401, "invalid_api_key", message, _CHALLENGE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or public_path(scope["path"], self.runtime):
            await self.app(scope, receive, send)
            return
        values = header_values(scope, b"authorization")
        if not values:
            raise self._fail(scope, "missing API key (send Authorization: Bearer <key>)")
        if len(values) > 1:
            raise self._fail(scope, "more than one Authorization header")
        raw = values[0]
        scheme, _, token = raw.partition(b" ")
        if scheme.lower() != b"bearer" or not token or len(token) > MAX_KEY_LENGTH:
            raise self._fail(scope, "malformed Authorization header (expected Bearer <key>)")
        try:
            presented = token.strip().decode("ascii")
        except UnicodeDecodeError:
            raise self._fail(scope, "malformed API key") from None
        key_id = await self.runtime.keys.verify(presented)
        if key_id is None:
            raise self._fail(scope, "invalid API key")
        state_of(scope).api_key_id = key_id
        await self.app(scope, receive, send)
