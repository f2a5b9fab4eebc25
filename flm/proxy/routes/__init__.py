"""Route handlers and the router that dispatches to them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from flm.openai.errors import HttpError, NoSuchRoute
from flm.proxy.asgi import Receive, RequestState, Scope, Send
from flm.proxy.runtime import ProxyRuntime

Handler = Callable[[Scope, Receive, Send, ProxyRuntime], Awaitable[None]]


class Router:
    """Exact paths plus the ``/engine/`` pass-through prefix."""

    def __init__(self, runtime: ProxyRuntime) -> None:
        from flm.proxy.routes import chat, misc, passthrough

        self.runtime = runtime
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": chat.chat_completions},
            "/v1/completions": {"POST": chat.completions},
            "/v1/embeddings": {"POST": chat.embeddings},
            "/v1/responses": {"POST": chat.responses},
            "/v1/models": {"GET": misc.models},
            "/v1/audio/transcriptions": {"POST": misc.transcriptions},
            "/v1/images/generations": {"POST": misc.images},
            "/v1/audio/speech": {"POST": misc.speech},
            "/health": {"GET": misc.health, "HEAD": misc.health},
            "/metrics": {"GET": misc.metrics},
        }
        self.passthrough = passthrough.engine_passthrough

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        methods = self.routes.get(path)
        state: RequestState = scope["flm"]
        if methods is None:
            if path.startswith("/engine/"):
                state.route = "/engine/{id}/{path}"
                await self.passthrough(scope, receive, send, self.runtime)
                return
            if path.startswith("/v1/models/") and scope["method"] in ("GET", "HEAD"):
                from flm.proxy.routes import misc

                state.route = "/v1/models/{id}"
                await misc.model(scope, receive, send, self.runtime)
                return
            if path.startswith("/v1/responses/"):
                from flm.proxy.routes import chat

                state.route = "/v1/responses/{id}"
                await chat.stored_response(scope, receive, send, self.runtime)
                return
            if path.startswith("/v1/"):
                # an OpenAI route FLM does not serve (say /v1/batches): what an SDK user
                # calls by mistake, not a probe, so a plain 404 that does not score
                raise HttpError(404, "not_found", f"FLM does not serve {path[:100]}")
            raise NoSuchRoute()
        handler = methods.get(scope["method"])
        state.route = path
        if handler is None:
            raise HttpError(
                405,
                "method_not_allowed",
                f"{scope['method']} not allowed here",
                [(b"allow", ", ".join(methods).encode())],
            )
        await handler(scope, receive, send, self.runtime)
