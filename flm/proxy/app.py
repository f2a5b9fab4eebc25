"""``build_app``: the whole gateway, with the middleware order of SPEC §4.1 in one place."""

from __future__ import annotations

from flm.proxy.asgi import ASGIApp
from flm.proxy.middleware.request import BASE_HEADERS, HSTS, RequestMiddleware
from flm.proxy.middleware.security import SecurityMiddleware
from flm.proxy.routes import Router
from flm.proxy.runtime import ProxyRuntime


def response_headers(*, tls: bool = False) -> list[tuple[bytes, bytes]]:
    """The fixed headers on every response of a gateway listener (``HttpServer(headers=)``):
    the security headers, and HSTS on HTTPS (the plain-HTTP redirect port takes them without
    HSTS; its 301 adds that itself). The server renders them once and adds them to every
    response, its own refusals included, instead of each request building them."""
    return [*BASE_HEADERS, HSTS] if tls else list(BASE_HEADERS)


def build_app(runtime: ProxyRuntime) -> ASGIApp:
    """Outermost first, as a request meets them (the fixed security headers of
    :func:`response_headers` are added by the server, to every response):

    1–3. request       — one middleware (see :mod:`flm.proxy.middleware.request`):
        1. request id  — X-Request-Id on every response (outermost so that error responses
                         carry it too)
        2. observe/audit — records every outcome, refusals included (outside the error step
                         so it sees the status each error became)
        3. errors      — any failure below becomes the JSON error contract
    4–12. security     — one middleware taking these steps in order (see
                         :mod:`flm.proxy.middleware.security`):
        4. IP block check — resolves the client address (trusted proxies only)
        5. resource protection — 503 ``overloaded`` above CPU/memory/connection limits
        6. intrusion/honeypot — scores attack-shaped requests, honeypot paths answer 404
        7. anomaly detection — request rate, body size, duration
        8. IP allow-list
        9. per-IP rate limit
        10. CORS — preflight answered without a key
        11. authentication — Bearer API key; failures feed the auto-block
        12. per-key rate limit
    13. router
    """
    app: ASGIApp = Router(runtime)
    app = SecurityMiddleware(app, runtime)
    app = RequestMiddleware(app, runtime)
    return app
