"""The web UI: an ASGI app the daemon serves on its loopback admin origin.

Pages are rendered on the server (Jinja2); ``static/ui.js`` adds copy buttons, dialogs, polling
and the chat tester. The app calls the same services as the CLI, in-process, and the daemon for
proxies. Its own security (see ``docs/architecture.md``):

- every request's ``Host`` must name this loopback origin (127.0.0.1, localhost or [::1] with the
  admin port), else 421 — a DNS-rebinding page cannot talk to it;
- a session comes only from a one-time login token (:mod:`flm.ui.sessions`); without one every
  route but ``/login`` and the static assets answers 401;
- every state change is a POST whose ``Origin`` is this origin and which carries the session's
  CSRF token (form field ``csrf`` or header ``X-CSRF-Token``), else 403;
- responses carry a strict CSP (no inline script or style, ``frame-ancestors 'none'``);
- a new key's plaintext is sent once, in the response to its creation, with ``no-store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from jinja2 import Environment, PackageLoader, select_autoescape

from flm.core.errors import FlmError, UsageError
from flm.services.context import Context
from flm.storage.dashboard import DashboardRepo
from flm.storage.dashboard import Scope as ChartScope
from flm.ui import charts, firewall, stats
from flm.ui.i18n import LANGUAGES, from_accept_language, translate
from flm.ui.sessions import Session, SessionStore
from flm.ui.web import BodyTooLarge, Receive, Request, Scope, Send, respond

log = logging.getLogger("flm.ui")

COOKIE = "flm_ui"
THEMES = ("system", "light", "dark")
PAGE_SIZE = 50
#: API keys per page of the API page's list (a filter finds one among thousands)
KEYS_PAGE = 50
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
HEALTH_SAMPLES = 40
STATS_TTL_S = 4.0
STATS_CACHED = 16
HEALTH_ENGINES = 32
NAV = (
    ("dashboard", "/"),
    ("api", "/api"),
    ("chat", "/chat"),
    ("wizard", "/wizard"),
    ("security", "/security"),
    ("profiles", "/profiles"),
    ("settings", "/settings"),
)


class DaemonHooks(Protocol):
    """What the UI asks of the daemon hosting it."""

    ctx: Context

    def status(self) -> dict[str, Any]: ...

    async def start_proxy(self, config: dict[str, Any]) -> dict[str, Any]: ...

    async def stop_proxies(
        self, *, port: int | None = None, handle_id: str | None = None, all_: bool = False
    ) -> tuple[list[str], list[str]]: ...

    async def reload(self, *, port: int | None = None) -> list[str]: ...


class Refused(Exception):
    def __init__(self, status: int, key: str) -> None:
        super().__init__(key)
        self.status = status
        self.key = key


class Page:
    """One request's view state: language, session, flash message, request id."""

    def __init__(self, req: Request, session: Session | None, lang: str, theme: str) -> None:
        self.req = req
        self.session = session
        self.lang = lang
        self.theme = theme
        self.request_id = "ui-" + secrets.token_hex(8)

    def t(self, key: str, **values: Any) -> str:
        return translate(self.lang, key, **values)


Handler = Callable[[Page], Awaitable[tuple[int, bytes, str, list[tuple[bytes, bytes]]]]]


def _static_files() -> dict[str, bytes]:
    root = resources.files("flm.ui").joinpath("static")
    return {
        f"/static/{item.name}": item.read_bytes()
        for item in root.iterdir()
        if item.name.endswith(tuple(STATIC_TYPES))
    }


def loopback_url(proxy: dict[str, Any]) -> str:
    """The URL this machine's browser reaches a proxy at (the chat tester's target)."""
    if proxy.get("mode") != "local-http" and proxy.get("https_port"):
        return f"https://localhost:{proxy['https_port']}"
    listen = str(proxy.get("listen") or "127.0.0.1")
    try:
        addr = ipaddress.ip_address(listen)
    except ValueError:
        return f"http://127.0.0.1:{proxy['port']}"
    if addr.is_unspecified or addr.is_loopback:
        host = "[::1]" if addr.version == 6 and addr.is_loopback else "127.0.0.1"
    else:
        host = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"http://{host}:{proxy['port']}"


class UiApp:
    def __init__(self, daemon: DaemonHooks) -> None:
        self.daemon = daemon
        self.ctx = daemon.ctx
        self.sessions = SessionStore()
        self.port = 0
        #: engine id -> recent (time, status, latency) samples, one per detection seen
        self.health: dict[str, deque[tuple[str, str, float | None]]] = {}
        #: (span, scope) -> (when, figures): polls within STATS_TTL_S share one read
        self._stats_cache: dict[tuple[str, ChartScope], tuple[float, dict[str, Any]]] = {}
        self._stats_lock = threading.Lock()
        self.static = _static_files()
        self.env = Environment(
            loader=PackageLoader("flm.ui", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/"): self.dashboard,
            ("GET", "/data/dashboard"): self.dashboard_data,
            ("POST", "/proxies/start"): self.proxy_start,
            ("POST", "/proxies/stop"): self.proxy_stop,
            ("POST", "/proxies/reload"): self.proxy_reload,
            ("GET", "/api"): self.api_page,
            ("POST", "/api/keys"): self.key_create,
            ("POST", "/api/keys/revoke"): self.key_revoke,
            ("POST", "/api/keys/rotate"): self.key_rotate,
            ("GET", "/api/key"): self.key_page,
            ("POST", "/api/keys/update"): self.key_update,
            ("POST", "/api/policy"): self.policy_form,
            ("POST", "/api/policy/json"): self.policy_json,
            ("GET", "/chat"): self.chat_page,
            ("GET", "/wizard"): self.wizard_page,
            ("POST", "/wizard/apply"): self.wizard_apply,
            ("GET", "/security"): self.security_page,
            ("GET", "/security/export"): self.security_export,
            ("POST", "/security/unblock"): self.security_unblock,
            ("POST", "/security/clear-temporary"): self.security_clear,
            ("GET", "/profiles"): self.profiles_page,
            ("POST", "/profiles/save"): self.profile_save,
            ("POST", "/profiles/delete"): self.profile_delete,
            ("POST", "/prompts/save"): self.prompt_save,
            ("POST", "/prompts/delete"): self.prompt_delete,
            ("GET", "/settings"): self.settings_page,
            ("POST", "/settings"): self.settings_save,
            ("POST", "/logout"): self.logout,
        }

    # --- the daemon's view ---------------------------------------------------------------------

    def set_port(self, port: int) -> None:
        self.port = port

    def live(self) -> bool:
        return self.sessions.live()

    def login_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/login?token={self.sessions.new_login_token()}"

    @property
    def origins(self) -> set[str]:
        return {
            f"http://127.0.0.1:{self.port}",
            f"http://localhost:{self.port}",
            f"http://[::1]:{self.port}",
        }

    # --- entry ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        req = Request(scope, receive)
        if req.headers.get("host", "").lower() not in {o.split("//", 1)[1] for o in self.origins}:
            await respond(
                send,
                421,
                b"misdirected request: this UI answers only on loopback\n",
                "text/plain; charset=utf-8",
                self._headers(),
            )
            return
        if req.method in ("GET", "HEAD") and req.path in self.static:
            name = req.path
            await respond(
                send,
                200,
                self.static[name],
                STATIC_TYPES[Path(name).suffix],
                self._headers(cache=True),
            )
            return
        session = self.sessions.get(req.cookies.get(COOKIE))
        lang, theme = await asyncio.to_thread(self._prefs, req)
        page = Page(req, session, lang, theme)
        try:
            if req.path == "/login" and req.method == "GET":
                await self.login(page, send)
                return
            if session is None:
                raise Refused(401, "error.no_session")
            if req.method not in ("GET", "HEAD"):
                self._check_state_change(req, session, await req.form())
            handler = self.routes.get(("GET" if req.method == "HEAD" else req.method, req.path))
            if handler is None:
                raise Refused(404, "error.not_found")
            status, body, kind, extra = await handler(page)
        except Refused as exc:
            status, body, kind, extra = self._refusal(page, exc.status, exc.key)
        except BodyTooLarge:
            status, body, kind, extra = self._refusal(page, 413, "error.too_large")
        except Exception:
            log.exception("UI: %s %s failed", req.method, req.path)
            status, body, kind, extra = self._refusal(page, 500, "error.internal")
        await respond(
            send,
            status,
            b"" if req.method == "HEAD" else body,
            kind,
            [
                *self._headers(),
                *extra,
                (b"x-request-id", page.request_id.encode()),
                # the time the page took on the server (the bench reads it; loopback only)
                (
                    b"server-timing",
                    f"app;dur={(time.perf_counter() - started) * 1000:.1f}".encode(),
                ),
            ],
        )

    def _check_state_change(self, req: Request, session: Session, form: dict[str, str]) -> None:
        origin = req.headers.get("origin")
        if origin is None or origin not in self.origins:
            raise Refused(403, "error.cross_site")
        token = req.headers.get("x-csrf-token") or form.get("csrf", "")
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise Refused(403, "error.csrf")

    def _prefs(self, req: Request) -> tuple[str, str]:
        lang_setting = self.ctx.config.get("preferred_language")
        lang = (
            str(lang_setting["value"])
            if lang_setting["source"] == "stored"
            else from_accept_language(req.headers.get("accept-language"))
        )
        theme = str(self.ctx.config.value("ui.theme"))
        return lang, theme

    def _proxy_origins(self) -> list[str]:
        out: list[str] = []
        for proxy in self.daemon.status()["proxies"]:
            url = loopback_url(proxy)
            out.append(url)
            if url.startswith("http://127.0.0.1:"):
                out.append(url.replace("127.0.0.1", "localhost"))
        return out

    def _headers(self, *, cache: bool = False) -> list[tuple[bytes, bytes]]:
        connect = " ".join(["'self'", *self._proxy_origins()])
        csp = (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src {connect}; form-action 'self'; frame-ancestors 'none'; "
            "base-uri 'none'"
        )
        return [
            (b"content-security-policy", csp.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"same-origin"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"cross-origin-resource-policy", b"same-origin"),
            (b"cache-control", b"no-cache" if cache else b"no-store"),
        ]

    # --- rendering -----------------------------------------------------------------------------

    def render(
        self, page: Page, template: str, status: int = 200, **values: Any
    ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        flash = page.session.data.pop("flash", None) if page.session else None
        proxies = self.daemon.status()["proxies"]
        html = self.env.get_template(template).render(
            t=page.t,
            lang=page.lang,
            theme=page.theme,
            page=page,
            csrf=page.session.csrf if page.session else "",
            nav=NAV if page.session else (),
            current=page.req.path,
            flash=json.loads(flash) if flash else None,
            gateway=proxies[0] if proxies else None,
            gateway_url=proxies[0]["endpoints"][0] if proxies and proxies[0]["endpoints"] else None,
            request_id=page.request_id,
            strings=self._js_strings(page),
            **values,
        )
        return status, html.encode(), "text/html; charset=utf-8", []

    @staticmethod
    def _js_strings(page: Page) -> dict[str, str]:
        from flm.ui.i18n import catalog

        return {k: page.t(k) for k in catalog("en") if k.startswith("js.")}

    def _refusal(
        self, page: Page, status: int, key: str
    ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        if page.req.wants_json or page.req.path.startswith("/data/"):
            body = json.dumps(
                {"error": {"message": page.t(key), "code": key, "request_id": page.request_id}}
            ).encode()
            return status, body, "application/json", []
        return self.render(page, "error.html", status, message=page.t(key), status_code=status)

    def _json(
        self, data: Any, status: int = 200
    ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        return status, json.dumps(data).encode(), "application/json", []

    def _done(
        self,
        page: Page,
        to: str,
        message: str,
        *,
        ok: bool = True,
        field: str = "",
        data: Any = None,
    ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        """The outcome of a form: JSON for script callers, else a redirect with a flash."""
        if page.req.wants_json:
            if ok:
                return self._json({"ok": True, "message": message, "data": data})
            return self._json(
                {"error": {"message": message, "field": field, "request_id": page.request_id}}, 400
            )
        if page.session is not None:
            page.session.data["flash"] = json.dumps(
                {"ok": ok, "text": message, "field": field, "request_id": page.request_id}
            )
        return 303, b"", "text/plain", [(b"location", to.encode())]

    def _failed(
        self, page: Page, to: str, exc: FlmError, field: str = ""
    ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        return self._done(page, to, exc.message, ok=False, field=field)

    # --- login / logout ------------------------------------------------------------------------

    async def login(self, page: Page, send: Send) -> None:
        redeemed = self.sessions.redeem(page.req.query.get("token", ""))
        if redeemed is None:
            status, body, kind, extra = self._refusal(page, 401, "error.bad_login")
            await respond(send, status, body, kind, self._headers() + extra)
            return
        sid, _ = redeemed
        cookie = f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict"
        # the token leaves the address bar at once: a redirect to a clean URL
        await respond(
            send,
            303,
            b"",
            "text/plain",
            [*self._headers(), (b"set-cookie", cookie.encode()), (b"location", b"/")],
        )

    async def logout(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        self.sessions.end(page.req.cookies.get(COOKIE))
        page.session = None
        status, body, kind, _ = self.render(page, "logged_out.html")
        return (
            status,
            body,
            kind,
            [(b"set-cookie", f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0".encode())],
        )

    # --- dashboard -----------------------------------------------------------------------------

    def _sample_health(self, engines: list[dict[str, Any]]) -> None:
        """One sample per engine per detection (the cached report changes at most every few
        seconds); at most ``HEALTH_SAMPLES`` per engine and ``HEALTH_ENGINES`` engines."""
        for e in engines:
            samples = self.health.get(e["id"])
            if samples is None:
                if len(self.health) >= HEALTH_ENGINES:
                    self.health.pop(next(iter(self.health)))
                samples = self.health[e["id"]] = deque(maxlen=HEALTH_SAMPLES)
            checked = float(e.get("checked_at") or time.time())
            when = datetime.fromtimestamp(checked, UTC).strftime("%H:%M:%S")
            if not samples or samples[-1][0] != when:
                samples.append((when, str(e["status"]), e.get("latency_ms")))

    def _scope(self, page: Page) -> ChartScope:
        """The key or engine the charts are narrowed to (``?key=ID`` / ``?engine=ID``)."""
        q = page.req.query
        for kind in ("key", "engine"):
            value = q.get(kind, "").strip()
            if value and len(value) <= 128 and value.isprintable():
                return (kind, value)
        return None

    def _audit_figures(self, span: str, scope: ChartScope) -> dict[str, Any]:
        """The figures that scan the audit window, shared by every view of (span, scope) for
        ``STATS_TTL_S`` (a UI left open polls; the gateway writes to the same database); at
        most ``STATS_CACHED`` views are kept."""
        now = time.monotonic()
        with self._stats_lock:
            cached = self._stats_cache.get((span, scope))
        if cached is not None and now - cached[0] < STATS_TTL_S:
            return cached[1]
        db = self.ctx.storage.security
        top = stats.top_users(db, span, scope)
        repo = DashboardRepo(db)
        labels = repo.key_labels([k for k, _ in top["keys"]])
        figures = {
            "minutes": stats.last_hour(db, span, scope),
            "top_keys": [(labels.get(k, k), n, k) for k, n in top["keys"]],
            "top_engines": top["engines"],
            "events": stats.recent_high_events(db),
        }
        with self._stats_lock:  # (reads run in worker threads)
            self._stats_cache.pop((span, scope), None)
            while len(self._stats_cache) >= STATS_CACHED:
                self._stats_cache.pop(next(iter(self._stats_cache)))
            self._stats_cache[(span, scope)] = (now, figures)
        return figures

    def _chart_values(
        self, page: Page, span: str, scope: ChartScope, figures: dict[str, Any], base: str
    ) -> dict[str, Any]:
        """The charts of one window and scope, as SVG, with the values table beside them.
        ``base`` is the page's path and query without ``range`` (the range links keep it)."""
        minutes: list[stats.Minute] = figures["minutes"]
        labels = [m.label for m in minutes]
        t = page.t
        drawn = [
            (
                "requests",
                charts.bars(
                    t("chart.requests"),
                    labels,
                    [charts.Series(t("chart.requests_series"), [m.total for m in minutes])],
                    kind="requests",
                ),
            ),
            (
                "latency",
                charts.lines(
                    t("chart.latency"),
                    labels,
                    [
                        charts.Series("p50", [m.p50 for m in minutes]),
                        charts.Series("p95", [m.p95 for m in minutes]),
                    ],
                    unit=" ms",
                    kind="latency",
                ),
            ),
            (
                "refusals",
                charts.bars(
                    t("chart.refusals"),
                    labels,
                    [
                        charts.Series("401", [m.unauthorized for m in minutes]),
                        charts.Series("429", [m.limited for m in minutes]),
                        charts.Series(t("chart.blocked"), [m.blocked for m in minutes]),
                    ],
                    kind="refusals",
                ),
            ),
            (
                "tokens",
                charts.bars(
                    t("chart.tokens"),
                    labels,
                    [
                        charts.Series(t("chart.prompt"), [m.prompt_tokens for m in minutes]),
                        charts.Series(
                            t("chart.completion"), [m.completion_tokens for m in minutes]
                        ),
                    ],
                    kind="tokens",
                ),
            ),
        ]
        if scope is None or scope[0] != "key":
            drawn.append(
                (
                    "keys",
                    charts.hbars(
                        t("chart.keys"),
                        [(label, n) for label, n, _ in figures["top_keys"]],
                        kind="keys",
                        empty=t("chart.no_requests"),
                        links=["/" + _query({"key": k}) for _, _, k in figures["top_keys"]],
                    ),
                )
            )
        if scope is None or scope[0] != "engine":
            drawn.append(
                (
                    "engines",
                    charts.hbars(
                        t("chart.engines"),
                        figures["top_engines"],
                        kind="engines",
                        empty=t("chart.no_requests"),
                        links=["/" + _query({"engine": e}) for e, _ in figures["top_engines"]],
                    ),
                )
            )
        joiner = "&" if "?" in base else "?"
        return {
            "span": span,
            "scope": scope,
            "range_links": {name: f"{base}{joiner}range={name}" for name in ("hour", "day")},
            "charts": drawn,
            "minutes": [
                m
                for m in minutes
                if m.total or m.unauthorized or m.limited or m.blocked or m.prompt_tokens
            ],
            "totals": {
                "requests": sum(m.total for m in minutes),
                "refusals": sum(m.unauthorized + m.limited + m.blocked for m in minutes),
                "tokens": sum(m.prompt_tokens + m.completion_tokens for m in minutes),
            },
        }

    async def _dashboard_values(self, page: Page) -> dict[str, Any]:
        report = await self.ctx.engines.adetect()
        engines = [e.to_dict() for e in report.engines]
        self._sample_health(engines)
        proxies = self.daemon.status()["proxies"]
        span = "day" if page.req.query.get("range") == "day" else "hour"
        scope = self._scope(page)

        def read() -> dict[str, Any]:
            db = self.ctx.storage.security
            repo = DashboardRepo(db)
            figures = self._audit_figures(span, scope)
            scope_label = None
            if scope is not None and scope[0] == "key":
                scope_label = repo.key_labels([scope[1]]).get(scope[1], scope[1])
            return {
                "figures": figures,
                "scope_label": scope_label,
                "active_keys": repo.active_keys(),
                "blocked": repo.blocked_addresses(),
                "policy": self.ctx.policy.show()["policy"],
            }

        data = await asyncio.to_thread(read)
        figures = data["figures"]
        base = "/" + (_query({scope[0]: scope[1]}) if scope else "")
        t = page.t
        policy = data["policy"]
        health = {
            e["id"]: charts.sparkline(list(self.health.get(e["id"], ())), t("engine.history"))
            for e in engines
        }
        return {
            "engines": engines,
            "proxies": proxies,
            "health": health,
            "proxy_urls": {p["id"]: loopback_url(p) for p in proxies},
            "poll_url": "/data/dashboard"
            + _query({"range": span, **({scope[0]: scope[1]} if scope else {})}),
            "scope_name": (data["scope_label"] or scope[1]) if scope else None,
            **self._chart_values(page, span, scope, figures, base),
            "summary": {
                "active_keys": data["active_keys"],
                "blocked": data["blocked"],
                "allow_list": list(policy.get("ip_whitelist") or []),
                "rate_limit": policy.get("rate_limit"),
                "events": figures["events"],
            },
            "default_port": int(self.ctx.config.value("proxy.port")),
        }

    async def dashboard(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        return self.render(page, "dashboard.html", **await self._dashboard_values(page))

    async def dashboard_data(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        values = await self._dashboard_values(page)
        module = self.env.get_template("dashboard_parts.html").make_module(
            dict(t=page.t, lang=page.lang, csrf=page.session.csrf if page.session else "", **values)
        )
        fragments = {
            name: str(getattr(module, f"{name}_part")())
            for name in ("engines", "proxies", "summary", "charts")
        }
        return self._json({"fragments": fragments})

    # --- proxies -------------------------------------------------------------------------------

    async def proxy_start(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()
        try:
            bind = form.get("bind") or "127.0.0.1"
            ipaddress.ip_address(bind)
            config = {
                "mode": form.get("mode") or "local-http",
                "port": firewall.check_ports([form.get("port") or 8080])[0],
                "bind": bind,
            }
            described = await self.daemon.start_proxy(config)
        except ValueError:
            return self._done(page, "/", page.t("error.bad_bind"), ok=False, field="bind")
        except FlmError as exc:
            return self._failed(page, "/", exc)
        return self._done(
            page, "/", page.t("proxy.started", port=described["port"]), data=described
        )

    async def proxy_stop(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()
        stopped, warnings = await self.daemon.stop_proxies(handle_id=form.get("handle_id", ""))
        message = page.t("proxy.stopped", ids=", ".join(stopped) or "-")
        # (a stop that happened is done; what could not be recorded is said beside it)
        return self._done(page, "/", " ".join([message, *warnings]))

    async def proxy_reload(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        try:
            reloaded = await self.daemon.reload()
        except FlmError as exc:
            return self._failed(page, "/", exc)
        return self._done(page, "/", page.t("proxy.reloaded", ids=", ".join(reloaded) or "-"))

    # --- API setup -----------------------------------------------------------------------------

    async def api_page(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        from flm.services.profiles import ProfileService

        try:
            models, model_errors = await self.ctx.engines.alist_models()
        except FlmError as exc:
            models, model_errors = [], {"-": exc.message}

        q = page.req.query
        search = q.get("kq", "").strip()[:100]
        try:
            number = max(1, min(10_000, int(q.get("kpage") or 1)))
        except ValueError:
            number = 1

        def read() -> dict[str, Any]:
            from flm.services.api_keys import key_view

            rows = self.ctx.keys.list()
            if search:
                needle = search.casefold()
                rows = [k for k in rows if needle in k.label.casefold() or needle in k.id]
            rows.sort(key=lambda k: (k.revoked_at is not None, k.created_at))
            shown = rows[(number - 1) * KEYS_PAGE : number * KEYS_PAGE]
            today = self.ctx.keys.today()
            profiles = ProfileService(self.ctx.storage)
            return {
                "keys": [key_view(k, today) for k in shown],
                "key_total": len(rows),
                "policy": self.ctx.policy.show(),
                "profiles": {
                    (p["engine_id"], p["model_id"]): p["label"] for p in profiles.profiles()
                },
                "prompts": sorted(profiles.effective_prompts()),
            }

        data = await asyncio.to_thread(read)
        policy = data["policy"]["policy"]
        return self.render(
            page,
            "api.html",
            models=[m.to_dict() for m in models],
            model_errors=model_errors,
            keys=data["keys"],
            key_total=data["key_total"],
            key_search=search,
            key_page=number,
            key_pages=max(1, -(-data["key_total"] // KEYS_PAGE)),
            key_query=lambda **kw: _query({"kq": search, **kw}),
            profiles=data["profiles"],
            prompts=data["prompts"],
            policy=policy,
            policy_text=json.dumps(policy, indent=2, sort_keys=True),
        )

    def _snippets(self, plaintext: str) -> dict[str, str]:
        proxies = self.daemon.status()["proxies"]
        base = (
            proxies[0]["endpoints"][0]
            if proxies and proxies[0]["endpoints"]
            else f"http://localhost:{self.ctx.config.value('proxy.port')}"
        )
        return {
            "curl": (f"curl {base}/v1/models \\\n  -H 'Authorization: Bearer {plaintext}'"),
            "python": (
                "from openai import OpenAI\n\n"
                f'client = OpenAI(base_url="{base}/v1", api_key="{plaintext}")\n'
                "print([m.id for m in client.models.list()])"
            ),
        }

    async def key_create(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        from flm.services.api_keys import build_limits

        form = await page.req.form()
        try:
            limits = build_limits(**_key_changes(form, update=False))
            row, plaintext = await asyncio.to_thread(
                self.ctx.keys.create, form.get("label", ""), limits
            )
        except FlmError as exc:
            return self._failed(page, "/api", exc, field=_key_field(exc.message))
        await self._reload_quietly()
        return self._key_shown(
            page,
            {"id": row.id, "label": row.label},
            plaintext,
            page.t("key.created", label=row.label),
        )

    def _key_shown(
        self, page: Page, key: dict[str, str], plaintext: str, message: str
    ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        # the one response that ever holds the plaintext: never cached, never stored
        if page.req.wants_json:
            return self._json(
                {
                    "ok": True,
                    "message": message,
                    "data": {
                        "key": key,
                        "plaintext": plaintext,
                        "snippets": self._snippets(plaintext),
                    },
                }
            )
        return self.render(
            page,
            "key_created.html",
            key=key,
            plaintext=plaintext,
            snippets=self._snippets(plaintext),
            message=message,
        )

    async def key_page(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        """One key: its scope and limits (with a form to change them), today's use against its
        budgets, and its charts over the last hour or day."""
        from flm.services.api_keys import key_view

        key_id = page.req.query.get("id", "")
        span = "day" if page.req.query.get("range") == "day" else "hour"
        scope: ChartScope = ("key", key_id)

        def read() -> dict[str, Any] | None:
            from flm.storage.security import ApiKeysRepo

            row = ApiKeysRepo(self.ctx.storage.security).get(key_id)
            if row is None:
                return None
            return {
                "key": key_view(row, self.ctx.keys.today(key_id)),
                "figures": self._audit_figures(span, scope),
            }

        data = await asyncio.to_thread(read)
        if data is None:
            raise Refused(404, "error.no_key")
        key = data["key"]
        return self.render(
            page,
            "key.html",
            key=key,
            scope_name=key["label"],
            **self._chart_values(
                page, span, scope, data["figures"], "/api/key" + _query({"id": key_id})
            ),
        )

    async def key_update(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()
        key_id = form.get("id", "")
        back = "/api/key" + _query({"id": key_id})
        try:
            changes = _key_changes(form, update=True)
            row = await asyncio.to_thread(self.ctx.keys.update, key_id, **changes)
        except FlmError as exc:
            return self._failed(page, back, exc, field=_key_field(exc.message))
        await self._reload_quietly()
        return self._done(page, back, page.t("key.updated", label=row.label))

    async def key_revoke(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()
        try:
            row = await asyncio.to_thread(self.ctx.keys.revoke, form.get("id", ""))
        except FlmError as exc:
            return self._failed(page, "/api", exc)
        await self._reload_quietly()
        return self._done(page, "/api", page.t("key.revoked", label=row.label))

    async def key_rotate(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()
        try:
            old, new, plaintext = await asyncio.to_thread(self.ctx.keys.rotate, form.get("id", ""))
        except FlmError as exc:
            return self._failed(page, "/api", exc)
        await self._reload_quietly()
        return self._key_shown(
            page,
            {"id": new.id, "label": new.label},
            plaintext,
            page.t("key.rotated", label=old.label),
        )

    async def _reload_quietly(self) -> None:
        """Running proxies pick up key/policy changes now (as ``flm`` does after a change)."""
        try:
            await self.daemon.reload()
        except FlmError as exc:
            log.warning("UI: reload after a change failed: %s", exc.message)

    async def policy_form(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()

        def lines(name: str) -> list[str]:
            return [
                x.strip() for x in form.get(name, "").replace(",", "\n").splitlines() if x.strip()
            ]

        def update() -> None:
            policy = dict(self.ctx.policy.show()["policy"])
            policy["ip_whitelist"] = lines("ip_whitelist")
            policy["trusted_proxies"] = lines("trusted_proxies")
            policy["cors"] = {
                **(policy.get("cors") or {}),
                "allowed_origins": lines("allowed_origins"),
            }
            rpm = form.get("rpm", "").strip()
            burst = form.get("burst", "").strip()
            if rpm:
                limit: dict[str, Any] = {"rpm": _int_field(rpm, "rate_limit.rpm")}
                if burst:
                    limit["burst"] = _int_field(burst, "rate_limit.burst")
                policy["rate_limit"] = limit
            else:
                policy.pop("rate_limit", None)
            self.ctx.policy.set(policy)

        try:
            await asyncio.to_thread(update)
        except FlmError as exc:
            return self._failed(page, "/api#policy", exc, field=_field_of(exc.message))
        await self._reload_quietly()
        return self._done(page, "/api#policy", page.t("policy.saved"))

    async def policy_json(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()
        try:
            await asyncio.to_thread(self.ctx.policy.set_text, form.get("policy", ""))
        except FlmError as exc:
            return self._failed(page, "/api#policy", exc, field="policy")
        await self._reload_quietly()
        return self._done(page, "/api#policy", page.t("policy.saved"))

    # --- chat tester ---------------------------------------------------------------------------

    async def chat_page(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        try:
            models, _ = await self.ctx.engines.alist_models()
        except FlmError:
            models = []
        proxies = self.daemon.status()["proxies"]
        return self.render(
            page,
            "chat.html",
            models=[m.flm_id for m in models if not m.embeddings_only],
            targets=[(p["id"], loopback_url(p)) for p in proxies],
        )

    # --- wizard --------------------------------------------------------------------------------

    async def wizard_page(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        q = page.req.query
        step = q.get("step", "1")
        step = step if step in ("1", "2", "3", "4") else "1"
        mode = q.get("mode") or "local-http"
        bind = q.get("bind") or "0.0.0.0"  # noqa: S104 - publishing is this wizard's purpose

        def read() -> dict[str, Any]:
            active = [k for k in self.ctx.keys.list() if k.revoked_at is None]
            return {
                "keys": len(active),
                "policy": self.ctx.policy.show()["policy"],
                "port": int(self.ctx.config.value("proxy.port")),
            }

        data = await asyncio.to_thread(read)
        allow_list = list(data["policy"].get("ip_whitelist") or [])
        values: dict[str, Any] = {
            "step": step,
            "mode": mode,
            "bind": bind,
            "port": q.get("port") or str(data["port"]),
            "keys": data["keys"],
            "allow_list": allow_list,
            "proxies": self.daemon.status()["proxies"],
            "warnings": _policy_warnings(allow_list, bind),
            "scripts": [],
            "error": None,
            "modes": ("local-http", "dev-selfsigned", "packaged-ca", "https-acme"),
        }
        if step == "4":
            try:
                base = firewall.check_ports([values["port"]])[0]
                ports = [base] if mode == "local-http" else [base, base + 1]
                values["ports"] = ports
                values["scripts"] = firewall.all_scripts(ports, allow_list)
            except UsageError as exc:
                values["error"] = exc.message
        return self.render(page, "wizard.html", **values)

    async def wizard_apply(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()
        back = "/wizard?step=4"
        if form.get("confirm") != "yes":
            return self._done(
                page, back, page.t("wizard.confirm_needed"), ok=False, field="confirm"
            )
        try:
            allow = list(self.ctx.policy.show()["policy"].get("ip_whitelist") or [])
            chosen = firewall.scripts(
                form.get("backend", ""), form.get("ports", "").split(","), allow
            )
            result = await asyncio.to_thread(
                firewall.apply, self.ctx.paths, chosen, rollback=form.get("rollback") == "yes"
            )
        except FlmError as exc:
            return self._failed(page, back, exc)
        ok = result["exit_status"] == 0
        return self._done(
            page,
            back,
            page.t("wizard.applied" if ok else "wizard.apply_failed", log=result["log"]),
            ok=ok,
            data=result,
        )

    # --- security ------------------------------------------------------------------------------

    def _events(self) -> Any:
        from flm.services.security_records import SecurityEvents

        return SecurityEvents(self.ctx.storage)

    async def security_page(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        q = page.req.query
        tab = q.get("tab") if q.get("tab") in ("audit", "intrusion", "anomaly") else "audit"
        try:
            number = max(1, min(10_000, int(q.get("page") or 1)))
        except ValueError:
            number = 1
        filters = {k: q[k] for k in ("event_type", "severity", "ip") if q.get(k)}
        offset = (number - 1) * PAGE_SIZE

        def read() -> dict[str, Any]:
            events = self._events()
            if tab == "audit":
                rows = events.audit_logs(limit=PAGE_SIZE + 1, offset=offset, **filters)
            elif tab == "intrusion":
                rows = events.intrusions(ip=filters.get("ip"), limit=PAGE_SIZE + 1, offset=offset)
            else:
                rows = events.anomalies(ip=filters.get("ip"), limit=PAGE_SIZE + 1, offset=offset)
            return {"rows": rows, "blocklist": events.blocklist()}

        error = None
        try:
            data = await asyncio.to_thread(read)
        except FlmError as exc:
            data, error = {"rows": [], "blocklist": []}, exc.message
        rows = data["rows"]
        return self.render(
            page,
            "security.html",
            tab=tab,
            rows=rows[:PAGE_SIZE],
            has_next=len(rows) > PAGE_SIZE,
            page_number=number,
            filters=filters,
            blocklist=data["blocklist"],
            error=error,
            query=lambda **kw: _query({"tab": tab, **filters, **kw}),
        )

    async def security_export(
        self, page: Page
    ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        fmt = "csv" if page.req.query.get("format") == "csv" else "json"
        filters = {
            k: page.req.query[k] for k in ("event_type", "severity", "ip") if page.req.query.get(k)
        }

        def run() -> bytes:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / f"audit.{fmt}"
                self._events().export(fmt, out, limit=100_000, **filters)
                return out.read_bytes()

        try:
            body = await asyncio.to_thread(run)
        except FlmError as exc:
            return self._failed(page, "/security", exc)
        name = f"flm-audit.{fmt}"
        return (
            200,
            body,
            "text/csv" if fmt == "csv" else "application/json",
            [(b"content-disposition", f'attachment; filename="{name}"'.encode())],
        )

    async def security_unblock(
        self, page: Page
    ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()
        try:
            await asyncio.to_thread(self._events().unblock, form.get("ip", ""))
        except FlmError as exc:
            return self._failed(page, "/security", exc)
        await self._reload_quietly()
        return self._done(page, "/security", page.t("security.unblocked", ip=form.get("ip")))

    async def security_clear(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        result = await asyncio.to_thread(self._events().clear_temporary)
        await self._reload_quietly()
        return self._done(page, "/security", page.t("security.cleared", n=result["cleared"]))

    # --- profiles & prompts --------------------------------------------------------------------

    async def profiles_page(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        from flm.services.profiles import PROMPT_APIS, ProfileService

        def read() -> dict[str, Any]:
            service = ProfileService(self.ctx.storage)
            return {"profiles": service.profiles(), "prompts": service.prompts()}

        data = await asyncio.to_thread(read)
        return self.render(
            page,
            "profiles.html",
            profiles=data["profiles"],
            prompts=data["prompts"],
            apis=PROMPT_APIS,
            default_params='{"temperature": 0.7}',
            json_dumps=lambda v: json.dumps(v, sort_keys=True),
        )

    async def profile_save(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        from flm.services.profiles import ProfileService

        form = await page.req.form()
        try:
            params = json.loads(form.get("parameters") or "{}")
        except ValueError as exc:
            return self._done(
                page,
                "/profiles",
                page.t("error.bad_json", detail=str(exc)),
                ok=False,
                field="parameters",
            )
        try:
            await asyncio.to_thread(
                ProfileService(self.ctx.storage).save_profile,
                form.get("engine_id", ""),
                form.get("model_id", ""),
                form.get("label", ""),
                params,
            )
        except FlmError as exc:
            return self._failed(page, "/profiles", exc)
        await self._reload_quietly()
        return self._done(page, "/profiles", page.t("profiles.saved"))

    async def profile_delete(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        from flm.services.profiles import ProfileService

        form = await page.req.form()
        try:
            await asyncio.to_thread(
                ProfileService(self.ctx.storage).delete_profile, form.get("id", "")
            )
        except FlmError as exc:
            return self._failed(page, "/profiles", exc)
        await self._reload_quietly()
        return self._done(page, "/profiles", page.t("profiles.deleted"))

    async def prompt_save(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        from flm.services.profiles import ProfileService

        form = await page.req.form()
        try:
            await asyncio.to_thread(
                ProfileService(self.ctx.storage).set_prompt,
                form.get("api_id", ""),
                form.get("template", ""),
            )
        except FlmError as exc:
            return self._failed(page, "/profiles", exc, field="template")
        await self._reload_quietly()
        return self._done(page, "/profiles", page.t("prompts.saved"))

    async def prompt_delete(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        from flm.services.profiles import ProfileService

        form = await page.req.form()
        try:
            await asyncio.to_thread(
                ProfileService(self.ctx.storage).delete_prompt, form.get("api_id", "")
            )
        except FlmError as exc:
            return self._failed(page, "/profiles", exc)
        await self._reload_quietly()
        return self._done(page, "/profiles", page.t("prompts.deleted"))

    # --- settings ------------------------------------------------------------------------------

    async def settings_page(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        return self.render(page, "settings.html", languages=LANGUAGES, themes=THEMES)

    async def settings_save(self, page: Page) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        form = await page.req.form()

        def save() -> None:
            if form.get("language"):
                self.ctx.config.set("preferred_language", form["language"])
            if form.get("theme"):
                self.ctx.config.set("ui.theme", form["theme"])

        try:
            await asyncio.to_thread(save)
        except FlmError as exc:
            return self._failed(page, "/settings", exc)
        lang = form.get("language") or page.lang
        back = form.get("next") or "/settings"
        if not back.startswith("/") or back.startswith("//") or "\\" in back:
            back = "/settings"
        return self._done(page, back, translate(lang, "settings.saved"))


def _int_field(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name}: expected a whole number, got {text!r}") from None


def _key_changes(form: dict[str, str], *, update: bool) -> dict[str, Any]:
    """A key form's settings as :func:`flm.services.api_keys.build_limits` takes them. On update
    the form shows every setting, so an emptied field lifts that limit (models: all, expiry:
    never); on creation an empty field sets nothing."""
    from flm.services.api_keys import LIMIT_FIELDS

    changes: dict[str, Any] = {}
    for name in LIMIT_FIELDS:
        text = form.get(name, "").strip()
        if text:
            changes[name] = _int_field(text, name)
        elif update:
            changes[name] = 0
    models = [x.strip() for x in form.get("models", "").replace(",", "\n").splitlines()]
    models = [m for m in models if m]
    if models or update:
        changes["models"] = models
    expires = form.get("expires", "").strip()
    if expires or update:
        changes["expires"] = expires or "never"
    changes["read_only"] = form.get("read_only") == "on"
    return changes


def _key_field(message: str) -> str:
    """The key form field a validation message names (the service names the CLI option)."""
    for name in ("daily_tokens", "daily_requests", "burst", "tpm", "rpm", "models", "expires"):
        if name in message or name.replace("_", "-") in message:
            return name
    return "label" if "label" in message else ""


def _field_of(message: str) -> str:
    """The policy form field a validation message names (the message carries the path)."""
    for name in ("ip_whitelist", "trusted_proxies", "allowed_origins", "burst", "rpm"):
        if name in message:
            return name
    return ""


def _query(values: dict[str, Any]) -> str:
    from urllib.parse import urlencode

    return "?" + urlencode({k: v for k, v in values.items() if v not in (None, "")})


def _policy_warnings(allow_list: list[str], bind: str) -> list[str]:
    """Locale keys of what the wizard warns about."""
    warnings: list[str] = []
    try:
        beyond_loopback = not ipaddress.ip_address(bind).is_loopback
    except ValueError:
        beyond_loopback = True
    if not allow_list and beyond_loopback:
        warnings.append("wizard.warn_empty_allow_list")
    nets = []
    for item in allow_list:
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(item, strict=False))
    if nets and all(n.is_private for n in nets):
        warnings.append("wizard.warn_private_only")
    return warnings
