"""Records the outcome of every request: metrics and one audit record (JSON Lines + row)."""

from __future__ import annotations

import time

from flm.proxy.asgi import ASGIApp, Receive, Scope, Send, state_of
from flm.proxy.runtime import ProxyRuntime


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            state = state_of(scope)
            metrics = self.runtime.metrics
            elapsed = time.perf_counter() - state.started
            status = state.status or 500
            metrics.record_request(state.route, status, state.engine_id or "", elapsed,
                                   state.overhead_s)
            audit = self.runtime.audit
            if audit is not None:
                audit.request(time.time(), state.request_id, state.client_ip, state.api_key_id,
                              scope["path"], scope["method"], state.engine_id, state.model,
                              status, elapsed * 1000, state.prompt_tokens,
                              state.completion_tokens, state.error_code)
