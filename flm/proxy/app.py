"""``build_app``: the whole gateway, with the middleware order of SPEC §4.1 in one place."""

from __future__ import annotations

from flm.proxy.asgi import ASGIApp
from flm.proxy.middleware.auth import AuthMiddleware
from flm.proxy.middleware.core import ErrorMiddleware, RequestIdMiddleware
from flm.proxy.middleware.cors import CorsMiddleware
from flm.proxy.middleware.observe import ObserveMiddleware
from flm.proxy.routes import Router
from flm.proxy.runtime import ProxyRuntime


def build_app(runtime: ProxyRuntime, *, tls: bool = False) -> ASGIApp:
    """Outermost first, as a request meets them:

    1. request id      — X-Request-Id + security headers on every response (outermost so
                         that error responses carry them too)
    2. observe/audit   — records every outcome, refusals included (outside the error layer
                         so it sees the status each error became)
    3. errors          — any failure below becomes the JSON error contract
    4. IP block check  — (security layer)
    5. intrusion/honeypot — (security layer)
    6. IP allow-list   — (security layer)
    7. per-IP rate limit — (security layer)
    8. CORS            — preflight answered without a key
    9. authentication  — Bearer API key
    10. per-key rate limit — (security layer)
    11. router
    """
    app: ASGIApp = Router(runtime)
    app = AuthMiddleware(app, runtime)
    app = CorsMiddleware(app, runtime)
    app = ErrorMiddleware(app)
    app = ObserveMiddleware(app, runtime)
    app = RequestIdMiddleware(app, hsts=tls)
    return app
