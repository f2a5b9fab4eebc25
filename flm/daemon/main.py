"""``python -m flm.daemon``: hosts proxies in one event loop and answers the admin API.

The run file ``run/proxy-daemon.json`` ({port, token, pid, started_at, the two database paths},
mode 0600) tells the CLI where the admin API listens and the bearer token it needs. The daemon
exits when its last proxy stops (or when the first start fails), so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import signal
import time
from typing import Any

from flm.core.errors import FlmError, ProxyAlreadyRunningError, ProxyError, UsageError
from flm.core.paths import Paths, ensure_private_dir, write_private_file
from flm.core.timeutil import now_iso
from flm.http.server import HttpServer, bind_socket
from flm.openai.errors import HttpError, refusal
from flm.proxy.asgi import Receive, Scope, Send, header, read_json, send_json
from flm.proxy.instance import RELOAD_INTERVAL_S, ProxyInstance, reload_proxies, start_instance
from flm.services.audit_events import record_security_event
from flm.services.context import Context
from flm.storage.config_db import ProxyHandleRow, ProxyHandlesRepo
from flm.ui.app import UiApp

log = logging.getLogger("flm.daemon")

RETENTION_INTERVAL_S = 3600.0
MAX_ADMIN_FAILURES = 5
ADMIN_BLOCK_S = 300.0
MODES = ("local-http", "dev-selfsigned", "packaged-ca", "https-acme")


class Daemon:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        #: told to the CLI, which refuses a start naming other databases
        self.databases = {
            "config_db": os.path.abspath(paths.config_db),
            "security_db": os.path.abspath(paths.security_db),
        }
        self.ctx = Context(paths)
        self.token = secrets.token_hex(32)
        self.instances: dict[str, ProxyInstance] = {}
        self.stop_event = asyncio.Event()
        self.failures: dict[str, list[float]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._in_flight = 0  # admin requests being served or queued on the lock
        self._served_start = False  # a start was asked for (until then the idle timer rules)
        self.started_at = time.time()
        self._lock = asyncio.Lock()
        #: the web UI, served on this origin for every path outside /admin/
        self.ui = UiApp(self)

    # --- proxies ---------------------------------------------------------------------------------

    async def start_proxy(self, config: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            mode = str(config.get("mode") or "local-http")
            if mode not in MODES:
                raise ProxyError(
                    f"mode {mode!r} is not available yet (supported: {', '.join(MODES)})"
                )
            port = int(config.get("port") or 8080)
            bind = str(config.get("bind") or "127.0.0.1")
            for inst in self.instances.values():
                taken = {inst.settings.port, inst.settings.https_port}
                if port in taken or (mode != "local-http" and port + 1 in taken):
                    raise ProxyAlreadyRunningError(
                        f"a proxy ({inst.settings.handle_id}) already runs on port {port}"
                    )
            handle_id = f"proxy-{port}"
            # (the web UI's chat tester calls the proxy, every worker of it, from the UI's origin)
            proxy = await start_instance(
                self.ctx, config, handle_id=handle_id, ui_origins=tuple(sorted(self.ui.origins))
            )
            try:
                await asyncio.to_thread(
                    ProxyHandlesRepo(self.ctx.storage.config).add,
                    ProxyHandleRow(
                        handle_id,
                        os.getpid(),
                        port,
                        proxy.settings.https_port,
                        bind,
                        mode,
                        json.dumps(config),
                        now_iso(),
                    ),
                )
            except BaseException as exc:
                # All or nothing: a proxy whose handle is not recorded is one `status` and
                # `stop` cannot see, so it is not left running.
                with contextlib.suppress(Exception):
                    await proxy.close()
                if isinstance(exc, FlmError):
                    exc.message = (
                        "the proxy was not started (stopped again): its handle "
                        f"could not be recorded in config.db: {exc.message}"
                    )
                raise
            self.instances[handle_id] = proxy
            log.info("proxy started", extra={"handle": handle_id, "port": port})
            return proxy.describe()

    async def stop_proxies(
        self, *, port: int | None = None, handle_id: str | None = None, all_: bool = False
    ) -> tuple[list[str], list[str]]:
        """Stop the chosen proxies; returns their ids and warnings (a stop that happened is
        reported as done even when its handle cannot be removed from config.db)."""
        async with self._lock:
            chosen = [
                i
                for i in self.instances.values()
                if all_ or i.settings.port == port or i.settings.handle_id == handle_id
            ]
            for inst in chosen:
                try:
                    await inst.close()
                except Exception:
                    # (e.g. the last audit batch cannot be written: disk full) its sockets are
                    # closed first, so it is stopped; the failure is logged, not kept as a
                    # proxy that no longer listens
                    log.exception("error while stopping %s", inst.settings.handle_id)
                finally:
                    self.instances.pop(inst.settings.handle_id, None)
            ids = [i.settings.handle_id for i in chosen]
            warnings: list[str] = []
            if ids:
                try:
                    await asyncio.to_thread(ProxyHandlesRepo(self.ctx.storage.config).remove, ids)
                except FlmError as exc:
                    warnings.append(
                        f"stopped, but the handles could not be removed from config.db "
                        f"({exc.message}); `flm proxy status` removes them once it can write"
                    )
                    log.warning("%s", warnings[-1])
            return ids, warnings

    async def reload(self, *, port: int | None = None, log_level: str | None = None) -> list[str]:
        """Apply the current policy, keys, blocklist and engines to running proxies. A stored
        policy that no longer validates is refused and the one in force stays."""
        chosen = [
            inst for inst in self.instances.values() if port is None or inst.settings.port == port
        ]
        return await reload_proxies(self.ctx, chosen, log_level)

    async def periodic_reload(self) -> None:
        """Every 30 s: pick up policy/key/blocklist/engine changes; every hour: archive audit
        rows past ``audit.retention_days`` (archived to JSON Lines, never deleted silently)."""
        next_retention = 0.0
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), RELOAD_INTERVAL_S)
            if self.stop_event.is_set():
                return
            try:
                await self.reload()
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + RETENTION_INTERVAL_S
                    await asyncio.to_thread(self._apply_retention)
            except FlmError as exc:
                log.warning("periodic reload failed: %s", exc.message)

    def _apply_retention(self) -> None:
        from flm.services.security_records import SecurityEvents

        days = int(self.ctx.config.value("audit.retention_days"))
        result = SecurityEvents(self.ctx.storage).apply_retention(days)
        if result is not None:
            log.info("audit retention: archived %d rows to %s", result["archived"], result["file"])

    async def renew(self, *, port: int | None = None, force: bool = True) -> list[dict[str, Any]]:
        """Renew the certificates of TLS proxies now (``force``) or when due, without restart."""
        chosen = [
            i
            for i in self.instances.values()
            if i.tls is not None and (port is None or i.settings.port == port)
        ]
        if not chosen:
            raise ProxyError("no running TLS proxy" + (f" on port {port}" if port else ""))
        return [await i.renew(force=force) for i in chosen]

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "proxies": [i.describe() for i in self.instances.values()],
            "ui_live": self.ui.live(),
        }

    # --- admin API -------------------------------------------------------------------------------

    def _authorised(self, scope: Scope) -> str:
        """``"ok"`` for the admin token (compared in constant time), else ``"bad"``, or
        ``"blocked"`` once an address has sent ``MAX_ADMIN_FAILURES`` bad tokens within
        ``ADMIN_BLOCK_S`` (recorded as an audit event when it happens). A blocked address is
        refused with 429 until the window passes, but the right token is always let in: the
        API is on loopback, where every local process has the same address, so a block that
        refused the owner too would let any of them lock it out."""
        client = scope.get("client")
        ip = client[0] if client else ""
        value = header(scope, b"authorization") or b""
        if hmac.compare_digest(value, b"Bearer " + self.token.encode()):
            return "ok"
        now = time.monotonic()
        recent = [t for t in self.failures.get(ip, []) if now - t < ADMIN_BLOCK_S]
        if len(recent) >= MAX_ADMIN_FAILURES:
            return "blocked"
        recent.append(now)
        self.failures[ip] = recent
        if len(recent) == MAX_ADMIN_FAILURES:
            log.warning("admin API: blocking %s after %d bad tokens", ip, len(recent))
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(
                    record_security_event,
                    self.ctx.storage,
                    "admin_auth_blocked",
                    "high",
                    {"client_ip": ip, "failures": len(recent), "block_s": ADMIN_BLOCK_S},
                )
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return "bad"

    async def admin_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if not path.startswith("/admin/"):
            await self.ui(scope, receive, send)
            return
        verdict = self._authorised(scope)
        if verdict == "blocked":
            await send_json(
                send,
                429,
                {
                    "error": {
                        "code": "UNAUTHORIZED",
                        "message": f"too many bad admin tokens; blocked for {ADMIN_BLOCK_S:.0f} s",
                    }
                },
            )
            return
        if verdict != "ok":
            await send_json(
                send,
                401,
                {"error": {"code": "UNAUTHORIZED", "message": "bad or missing admin token"}},
            )
            return
        self._in_flight += 1
        try:
            await self._admin(path, method, receive, scope, send)
        finally:
            self._in_flight -= 1
            if self._idle() and self._served_start:
                # A daemon left with no proxy (its last one stopped, or the start it was made
                # for failed) goes away, but never under a request still queued behind this
                # one (a start racing a stop).
                self.stop_event.set()

    async def _admin(
        self, path: str, method: str, receive: Receive, scope: Scope, send: Send
    ) -> None:
        try:
            body: dict[str, Any] = {}
            if method == "POST":
                parsed = await read_json(receive, scope, 1024 * 1024)
                body = parsed if isinstance(parsed, dict) else {}
            if path == "/admin/health" and method == "GET":
                result: Any = {"ok": True}
            elif path == "/admin/status" and method == "GET":
                result = self.status()
            elif path == "/admin/start" and method == "POST":
                self._served_start = True
                result = await self.start_proxy(body)
            elif path == "/admin/stop" and method == "POST":
                stopped, warnings = await self.stop_proxies(
                    port=body.get("port"),
                    handle_id=body.get("handle_id"),
                    all_=bool(body.get("all")),
                )
                result = {"stopped": stopped}
                if warnings:
                    result["warnings"] = warnings
            elif path == "/admin/renew" and method == "POST":
                result = {
                    "renewed": await self.renew(
                        port=body.get("port"), force=bool(body.get("force", True))
                    )
                }
            elif path == "/admin/ui-login" and method == "POST":
                # a one-time web UI login link (2 minutes, single use); the daemon stays up
                # while it is unspent or a session made from it is live
                result = {"url": self.ui.login_url()}
            elif path == "/admin/reload" and method == "POST":
                level = body.get("log_level")
                result = {
                    "reloaded": await self.reload(
                        port=body.get("port"), log_level=level if isinstance(level, str) else None
                    )
                }
            else:
                await send_json(
                    send, 404, {"error": {"code": "NOT_FOUND", "message": "no such admin route"}}
                )
                return
        except FlmError as exc:
            await send_json(send, 400, {"error": exc.to_dict()})
            return
        except (HttpError, ValueError, TypeError) as exc:
            # a body that is not JSON, a malformed field (e.g. a port that is text)
            message = exc.message if isinstance(exc, HttpError) else str(exc)
            await send_json(
                send,
                400,
                {"error": {"code": UsageError.code, "message": f"bad admin request: {message}"}},
            )
            return
        except Exception:
            log.exception("admin API: %s %s failed", method, path)
            await send_json(
                send,
                500,
                {"error": {"code": "INTERNAL_ERROR", "message": "internal error (see daemon.log)"}},
            )
            return
        await send_json(send, 200, {"data": result})

    # --- lifecycle -------------------------------------------------------------------------------

    def _idle(self) -> bool:
        """No proxy, no admin request under way, no web UI session or unspent login link."""
        return not self.instances and self._in_flight == 0 and not self.ui.live()

    async def _exit_if_idle(self, grace_s: float = 60.0, every_s: float = 5.0) -> None:
        """A daemon nobody asked to start a proxy within ``grace_s`` goes away; so does one
        whose last web UI session ended (logout or expiry) with no proxy left."""
        await asyncio.sleep(grace_s)
        while True:
            async with self._lock:  # a start under way (an ACME order may take 90 s) ends first
                if self._idle():
                    self.stop_event.set()
                    return
            await asyncio.sleep(every_s)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        admin_sock = bind_socket("127.0.0.1", 0)
        admin = HttpServer(self.admin_app, admin_sock, refusal=refusal)
        await admin.start()
        self.ui.set_port(admin.port)
        info = {
            "port": admin.port,
            "token": self.token,
            "pid": os.getpid(),
            "started_at": now_iso(),
            **self.databases,
        }
        ensure_private_dir(self.paths.run_dir)
        write_private_file(self.paths.daemon_file, json.dumps(info).encode())
        reloader = asyncio.ensure_future(self.periodic_reload())
        idle = asyncio.ensure_future(self._exit_if_idle())
        try:
            await self.stop_event.wait()
        finally:
            reloader.cancel()
            idle.cancel()
            await self.stop_proxies(all_=True)
            await admin.stop()
            with contextlib.suppress(OSError):
                current = json.loads(self.paths.daemon_file.read_text())
                if current.get("pid") == os.getpid():
                    self.paths.daemon_file.unlink()
            self.ctx.close()
        return 0


def run() -> int:
    from flm.core.jsonlog import setup_logging

    setup_logging(os.environ.get("FLM_LOG_LEVEL") or "INFO")
    paths = Paths.resolve(
        config_db=os.environ.get("FLM_DB_PATH_CONFIG") or None,
        security_db=os.environ.get("FLM_DB_PATH_SECURITY") or None,
    )
    ensure_private_dir(paths.run_dir)
    lock_path = paths.run_dir / "daemon.lock"
    import fcntl

    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    deadline = time.monotonic() + 1.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            # A CLI's liveness probe holds a shared lock for an instant: try again briefly.
            if time.monotonic() >= deadline:
                os.close(fd)
                log.error("another FLM daemon holds %s", lock_path)
                return 3
            time.sleep(0.01)
    try:
        try:
            import uvloop

            return uvloop.run(Daemon(paths).serve())
        except ImportError:  # pragma: no cover - Windows
            return asyncio.run(Daemon(paths).serve())
    finally:
        os.close(fd)
