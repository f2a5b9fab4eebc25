"""One running proxy: its sockets, egress, certificate, servers and certificate renewal.

Used by the daemon and by ``--no-daemon``. :func:`start_instance` goes in this order, so that a
failure at any step leaves nothing behind (every socket closed, every server stopped):

1. validate the options (:class:`~flm.services.proxy_config.StartConfig`);
2. bind ``port`` (and ``port + 1`` in the TLS modes): "port in use" is known before anything;
3. decide the egress: the SOCKS endpoint is probed (3 tries); fail-closed refuses the start,
   fail-open falls back to direct; the events go to ``audit_logs``;
4. TLS modes: the HTTP port starts answering (301 to HTTPS; in ``https-acme`` also the HTTP-01
   challenges, which the ACME CA fetches while the certificate is being obtained), then the
   certificate is issued, reused or obtained (:mod:`flm.services.certs`);
5. the gateway starts (on HTTPS in the TLS modes, with a :class:`ReloadableServerContext`), and a
   renewal task renews the certificate 30 days before it ends and swaps it into the running
   server without a restart. :meth:`ProxyInstance.renew` forces that now (``flm proxy renew``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flm.core.errors import FlmError, ProxyError
from flm.core.heap import release_heap, settle_heap
from flm.core.threads import latency_slice
from flm.core.timeutil import iso
from flm.http.server import HttpServer, bind_socket
from flm.openai.errors import refusal
from flm.proxy.app import build_app, response_headers
from flm.proxy.redirect import RedirectApp
from flm.proxy.runtime import ProxyRuntime, ProxySettings, build_runtime
from flm.services.audit_events import record_security_event
from flm.services.certs import (
    RENEW_BEFORE_DAYS,
    AcmeSettings,
    CertificateService,
    due_for_renewal,
    resolve_acme_settings,
    trust_hints,
)
from flm.services.proxy_config import ACME_MODE, LOCAL_HTTP, StartConfig

if TYPE_CHECKING:
    from flm.egress.config import EgressConfig
    from flm.egress.policy import EffectiveEgress
    from flm.proxy.supervisor import WorkerGroup
    from flm.services.context import Context
    from flm.tls.certs import CertBundle
    from flm.tls.challenge import ChallengeStore
    from flm.tls.context import ReloadableServerContext

log = logging.getLogger("flm.proxy")

#: Audit event when the egress proxy is down and the start is refused (fail-closed).
EVENT_EGRESS_REFUSED = "egress_unreachable"
EVENT_RENEWED = "certificate_renewed"
EVENT_RENEWAL_FAILED = "certificate_renewal_failed"

#: Renewal task: look again at least this often, and never sooner than this.
MAX_CHECK_INTERVAL_S = 12 * 3600.0
MIN_CHECK_INTERVAL_S = 60.0


@dataclass
class TlsState:
    holder: ReloadableServerContext
    #: ``issued``, ``stored`` (reused) or ``stored-fallback`` (ACME failed, stored one valid).
    source: str
    acme: AcmeSettings | None = None
    challenges: ChallengeStore | None = None
    renewals: int = 0
    renewed_at: float | None = None

    @property
    def bundle(self) -> CertBundle:
        return self.holder.bundle


class ProxyInstance:
    """A started proxy. ``settings`` and ``runtime`` are what reloads touch."""

    def __init__(
        self,
        ctx: Context,
        config: StartConfig,
        settings: ProxySettings,
        runtime: ProxyRuntime,
        servers: list[HttpServer],
        egress: EffectiveEgress,
        tls: TlsState | None,
        notes: list[str],
        *,
        sibling: bool = False,
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.settings = settings
        self.runtime = runtime
        self.servers = servers
        self.egress = egress
        self.tls = tls
        self.notes = notes
        self.started_at = time.time()
        self.last_error: str | None = None
        self.renew_before_days = RENEW_BEFORE_DAYS
        self._renew_lock = asyncio.Lock()
        self._renewal_task: asyncio.Task[None] | None = None
        #: ``--workers N``: this process is worker 0 and supervises workers 1..N-1
        self.workers: WorkerGroup | None = None
        #: a worker started by a supervisor (serves the gateway port only; no renewal)
        self.sibling = sibling

    # --- status ----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        s = self.settings
        bundle = self.tls.bundle if self.tls else None
        out: dict[str, Any] = {
            "id": s.handle_id,
            "mode": s.mode,
            "port": s.port,
            "https_port": s.https_port,
            "listen": s.bind,
            "endpoints": user_endpoints(s, self.config.acme_domains or self.config.acme_domain),
            "egress": self.egress.to_dict(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "certificate_expiry": iso(bundle.not_after) if bundle else None,
            "certificate": None,
            "last_error": self.last_error,
            "engines": self.runtime.engines.ids(),
            "notes": list(self.notes),
            "pools": self.runtime.engines.pools.snapshot(),
            "audit": self.runtime.audit.status() if self.runtime.audit is not None else None,
            "workers": (
                self.workers.describe(self.runtime.metrics.served, self.started_at)
                if self.workers is not None
                else None
            ),
            "state": self.runtime.shared.describe()
            if self.runtime.shared is not None
            else {"backend": "local"},
        }
        if bundle is not None and self.tls is not None and s.https_port is not None:
            cert = bundle.to_dict()
            cert.update(
                source=self.tls.source, renewals=self.tls.renewals, key_path=str(bundle.key_path)
            )
            if self.tls.acme is not None:
                cert.update(
                    challenge=self.tls.acme.challenge,
                    names=list(self.tls.acme.all_names),
                    dns_profile=self.tls.acme.dns_profile,
                )
            out["certificate"] = cert
            hints = trust_hints(bundle, s.https_port)
            if hints:
                out["trust"] = hints
        return out

    # --- renewal ---------------------------------------------------------------------------------

    def start_renewal(self) -> None:
        if self.tls is not None and self._renewal_task is None and not self.sibling:
            self._renewal_task = asyncio.ensure_future(self._renewal_loop())

    def _next_check_s(self, failures: int) -> float:
        if failures:
            return min(MAX_CHECK_INTERVAL_S / 12, MIN_CHECK_INTERVAL_S * 2.0 ** min(failures, 10))
        assert self.tls is not None
        due = self.tls.bundle.not_after.timestamp() - self.renew_before_days * 86400
        return max(MIN_CHECK_INTERVAL_S, min(MAX_CHECK_INTERVAL_S, due - time.time()))

    async def _renewal_loop(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self._next_check_s(failures))
            try:
                await self.renew(force=False)
                failures = 0
            except FlmError as exc:
                failures += 1
                log.warning(
                    "certificate renewal failed: %s",
                    exc.message,
                    extra={"handle": self.settings.handle_id},
                )
            except Exception:  # never let the task die silently
                failures += 1
                log.exception("certificate renewal crashed")

    async def renew(self, *, force: bool = False) -> dict[str, Any]:
        """Renew the certificate if it is due (or now, with ``force``) and swap it in.

        Connections already open keep the certificate they negotiated; new ones get the new one.
        """
        tls = self.tls
        if tls is None:
            raise ProxyError(
                f"{self.settings.handle_id} serves plain HTTP: no certificate to renew"
            )
        certs = CertificateService(self.ctx.storage)
        async with self._renew_lock:
            old = tls.bundle
            due = force or due_for_renewal(old, self.renew_before_days)
            if tls.acme is not None:
                if not due:
                    return self._renew_result(old, old, renewed=False)
                assert tls.challenges is not None
                try:
                    fresh = await asyncio.to_thread(
                        certs.obtain_acme, tls.acme, tls.challenges, self.runtime.egress
                    )
                except FlmError as exc:
                    self.last_error = f"certificate renewal failed ({exc.code}): {exc.message}"
                    await asyncio.to_thread(
                        record_security_event,
                        self.ctx.storage,
                        EVENT_RENEWAL_FAILED,
                        "medium",
                        {
                            "handle": self.settings.handle_id,
                            "domain": tls.acme.domain,
                            "names": list(tls.acme.all_names),
                            "challenge": tls.acme.challenge,
                            "code": exc.code,
                            "error": exc.message,
                            "fallback": "the current certificate keeps serving",
                            "certificate_expiry": iso(old.not_after),
                        },
                    )
                    raise
            else:
                fresh = await asyncio.to_thread(certs.local, self.settings.mode)
            renewed = fresh.fingerprint_sha256 != old.fingerprint_sha256
            if renewed:
                tls.holder.replace(fresh)
                tls.renewals += 1
                tls.renewed_at = time.time()
                tls.source = "issued"
                await asyncio.to_thread(
                    record_security_event,
                    self.ctx.storage,
                    EVENT_RENEWED,
                    "info",
                    {
                        "handle": self.settings.handle_id,
                        "mode": self.settings.mode,
                        "fingerprint_sha256": fresh.fingerprint_sha256,
                        "previous_fingerprint_sha256": old.fingerprint_sha256,
                        "not_after": iso(fresh.not_after),
                    },
                )
            if self.last_error and self.last_error.startswith("certificate renewal failed"):
                self.last_error = None
        if renewed and self.workers is not None:
            await self.workers.reload()  # (they load the new certificate from storage)
        return self._renew_result(old, fresh, renewed=renewed)

    async def reload_certificate(self) -> bool:
        """A worker (``sibling``): serve the stored certificate if worker 0 renewed it."""
        if self.tls is None or not self.sibling:
            return False
        fresh = await asyncio.to_thread(_stored_certificate, self.ctx, self.config)
        if fresh.fingerprint_sha256 == self.tls.bundle.fingerprint_sha256:
            return False
        self.tls.holder.replace(fresh)
        self.tls.renewals += 1
        self.tls.renewed_at = time.time()
        return True

    def _renew_result(self, old: CertBundle, new: CertBundle, *, renewed: bool) -> dict[str, Any]:
        return {
            "id": self.settings.handle_id,
            "renewed": renewed,
            "fingerprint_sha256": new.fingerprint_sha256,
            "previous_fingerprint_sha256": old.fingerprint_sha256,
            "not_after": iso(new.not_after),
        }

    # --- stop ------------------------------------------------------------------------------------

    async def close(self) -> None:
        if self.workers is not None:
            await self.workers.stop()
        if self._renewal_task is not None:
            self._renewal_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal_task
            self._renewal_task = None
        for server in reversed(self.servers):
            await server.stop()
        await self.runtime.close()
        # What the start froze goes back to the collector, so what this proxy leaves behind
        # can be freed (a daemon may start and stop proxies for a long time).
        release_heap()


# --- start ---------------------------------------------------------------------------------------


def _settings(config: StartConfig, ctx: Context, handle: str) -> ProxySettings:
    """What a gateway process is started with, from its start configuration."""
    return ProxySettings(
        port=config.port,
        bind=config.bind,
        mode=config.mode,
        handle_id=handle,
        https_port=config.https_port,
        max_body_bytes=int(ctx.config.value("proxy.max_body_bytes")),
    )


async def start_instance(
    ctx: Context,
    raw: dict[str, Any],
    *,
    handle_id: str | None = None,
    sibling: bool = False,
    ui_origins: tuple[str, ...] = (),
) -> ProxyInstance:
    """Start one proxy from ``proxy start``'s options (see the module docstring); with
    ``--workers N`` also its N-1 sibling workers (:mod:`flm.proxy.supervisor`). ``sibling``:
    start as one of those workers. ``ui_origins``: the daemon's web UI origins, which may call
    the proxy (see :meth:`ProxyRuntime.allow_ui_origins`). Once it serves, what the start
    built is frozen out of the garbage collector's scans (:func:`settle_heap`), and the
    event loop's thread asks the kernel for a short time slice (:func:`latency_slice`)."""
    instance = await _start_instance(ctx, raw, handle_id, sibling, ui_origins)
    settle_heap()
    latency_slice()
    return instance


async def _start_instance(
    ctx: Context,
    raw: dict[str, Any],
    handle_id: str | None,
    sibling: bool,
    ui_origins: tuple[str, ...],
) -> ProxyInstance:
    config = StartConfig.from_dict(raw)
    handle = handle_id or f"proxy-{config.port}"
    if sibling:
        instance = await _start_sibling(ctx, config, handle)
        if ui_origins:
            instance.runtime.allow_ui_origins(ui_origins)
        return instance
    reuse = config.workers > 1
    gateway_port = config.https_port if config.https_port is not None else config.port
    if reuse:
        # A port another program (or another FLM proxy with workers) already holds is
        # refused as without workers: SO_REUSEPORT would silently share it with them.
        bind_socket(config.bind, gateway_port).close()
    sockets = [bind_socket(config.bind, config.port, reuse_port=reuse and not config.tls)]
    servers: list[HttpServer] = []
    runtime: ProxyRuntime | None = None
    shared = None
    try:
        if config.state is not None:
            from flm.proxy.shared import attach_shared, start_shared

            # (before the runtime reads keys and policy: the shared ones are stored first)
            shared = await start_shared(ctx, config.state, handle)
        if config.https_port is not None:
            sockets.append(bind_socket(config.bind, config.https_port, reuse_port=reuse))
        egress = await decide_start_egress(ctx, config.egress, handle)
        notes = []
        damage = await asyncio.to_thread(_quick_check, ctx.storage.security)
        if damage:
            notes.append(damage)
            log.error("%s", damage)
        if egress.fell_back:
            notes.append(
                f"egress {egress.requested.mode} is unreachable: using direct "
                "connections (--egress-fail-open)"
            )
        settings = _settings(config, ctx, handle)
        tls: TlsState | None = None
        if config.mode == LOCAL_HTTP:
            runtime = build_runtime(settings, ctx, egress.config)
            if shared is not None:
                await attach_shared(shared, runtime)
            servers.append(
                HttpServer(
                    build_app(runtime),
                    sockets[0],
                    body_timeout_s=settings.body_timeout_s,
                    headers=response_headers(),
                    refusal=refusal,
                    limits=runtime.connection_limits,
                )
            )
            await servers[-1].start()
        else:
            assert config.https_port is not None
            tls = await _prepare_tls(ctx, config, sockets[0], servers, notes, egress.config)
            runtime = build_runtime(settings, ctx, egress.config)
            if shared is not None:
                await attach_shared(shared, runtime)
            servers.append(
                HttpServer(
                    build_app(runtime),
                    sockets[1],
                    tls.holder.context,
                    body_timeout_s=settings.body_timeout_s,
                    headers=response_headers(tls=True),
                    refusal=refusal,
                    limits=runtime.connection_limits,
                )
            )
            await servers[-1].start()
    except BaseException:
        for server in reversed(servers):
            with contextlib.suppress(Exception):
                await server.stop()
        for sock in sockets:
            sock.close()
        if runtime is not None:
            await runtime.close()
        elif shared is not None:
            await shared.close()
        raise
    from flm.proxy.health import watch_if_alerting

    watch_if_alerting(runtime)
    instance = ProxyInstance(ctx, config, settings, runtime, servers, egress, tls, notes)
    if shared is not None:
        shared.reload = lambda: reload_proxies(ctx, [instance])
        if not shared.available:
            notes.append(
                f"the state backend {shared.config.display} is unreachable: serving on local "
                "state until it answers (--state-fail-open)"
            )
    if tls is not None and tls.source == "stored-fallback":
        instance.last_error = notes[-1] if notes else None
    if damage:
        instance.last_error = damage
    instance.start_renewal()
    if ui_origins:
        runtime.allow_ui_origins(ui_origins)
    if reuse:
        await _start_workers(ctx, instance, raw, ui_origins)
    return instance


async def _start_workers(
    ctx: Context, instance: ProxyInstance, raw: dict[str, Any], ui_origins: tuple[str, ...]
) -> None:
    """Start workers 1..N-1 of ``instance``; if they cannot all start, nothing keeps running."""
    from flm.proxy.supervisor import WorkerGroup

    message = {**_worker_message(ctx, instance, raw), "ui_origins": list(ui_origins)}
    group = WorkerGroup(ctx, instance.settings.handle_id, message, instance.config.workers)
    try:
        await group.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await instance.close()
        raise
    instance.workers = group


def _worker_message(ctx: Context, instance: ProxyInstance, raw: dict[str, Any]) -> dict[str, Any]:
    """What a worker starts from: this proxy's options, handle and databases."""
    effective = instance.egress.config
    return {
        # (the workers use the egress in force, probed once here, rather than probe again)
        "config": {
            **raw,
            "egress_mode": effective.mode,
            "socks5_endpoint": effective.socks5_endpoint,
            "egress_fail_open": False,
        },
        "handle_id": instance.settings.handle_id,
        "paths": {
            "home": str(ctx.paths.home),
            "config_db": os.path.abspath(ctx.paths.config_db),
            "security_db": os.path.abspath(ctx.paths.security_db),
        },
    }


async def _start_sibling(ctx: Context, config: StartConfig, handle: str) -> ProxyInstance:
    """One worker of a ``--workers N`` proxy: the gateway port only (worker 0 answers the
    plain-HTTP port of the TLS modes and renews the certificate)."""
    from flm.egress.policy import EffectiveEgress

    port = config.https_port if config.https_port is not None else config.port
    sock = bind_socket(config.bind, port, reuse_port=True, listen=False)
    servers: list[HttpServer] = []
    runtime: ProxyRuntime | None = None
    shared = None
    try:
        if config.state is not None:
            from flm.proxy.shared import attach_shared, start_shared

            shared = await start_shared(ctx, config.state, handle)
        egress = EffectiveEgress(config.egress, config.egress)
        settings = _settings(config, ctx, handle)
        tls: TlsState | None = None
        if config.tls:
            from flm.tls.context import ReloadableServerContext

            bundle = await asyncio.to_thread(_stored_certificate, ctx, config)
            tls = TlsState(ReloadableServerContext(bundle), "stored")
        runtime = build_runtime(settings, ctx, egress.config)
        if shared is not None:
            await attach_shared(shared, runtime)
        servers.append(
            HttpServer(
                build_app(runtime),
                sock,
                tls.holder.context if tls is not None else None,
                body_timeout_s=settings.body_timeout_s,
                headers=response_headers(tls=tls is not None),
                refusal=refusal,
                limits=runtime.connection_limits,
            )
        )
        await servers[-1].start()
    except BaseException:
        for server in servers:
            with contextlib.suppress(Exception):
                await server.stop()
        sock.close()
        if runtime is not None:
            await runtime.close()
        elif shared is not None:
            await shared.close()
        raise
    instance = ProxyInstance(ctx, config, settings, runtime, servers, egress, tls, [], sibling=True)
    if shared is not None:  # (this worker hears the backend's announcements itself)
        shared.reload = lambda: reload_proxies(ctx, [instance])
    return instance


def _stored_certificate(ctx: Context, config: StartConfig) -> CertBundle:
    """The certificate worker 0 serves, from storage (never a new ACME order)."""
    certs = CertificateService(ctx.storage)
    if config.mode != ACME_MODE:
        return certs.local(config.mode)
    assert config.acme_domain is not None
    bundle = certs.stored_acme(config.acme_domain, config.acme_domains)
    if bundle is None:
        raise ProxyError(f"no stored certificate for {config.acme_domain} to serve")
    return bundle


def _quick_check(db: Any) -> str | None:
    """A damaged security.db is said at start (not only by ``flm check``): SQLite's
    ``quick_check`` (one pass over the pages, no index cross-check)."""
    from flm.storage.files import integrity_problems

    rows = integrity_problems(db.path, quick=True, limit=5)
    if not rows:
        return None
    return (
        f"security.db fails SQLite's quick_check ({'; '.join(rows)[:500]}): run "
        "`flm check --verbose` and restore a backup (`flm security backup restore`)"
    )


async def _prepare_tls(
    ctx: Context,
    config: StartConfig,
    http_sock: socket.socket,
    servers: list[HttpServer],
    notes: list[str],
    egress: EgressConfig,
) -> TlsState:
    """Start the HTTP port (redirect/challenges) and get the certificate."""
    from flm.tls.challenge import ChallengeStore
    from flm.tls.context import ReloadableServerContext

    assert config.https_port is not None
    certs = CertificateService(ctx.storage)
    if config.mode != ACME_MODE:
        default_host = (
            "localhost"
            if config.bind in ("127.0.0.1", "::1", "0.0.0.0", "::")  # noqa: S104
            else config.bind
        )
        servers.append(
            HttpServer(
                RedirectApp(config.https_port, default_host),
                http_sock,
                headers=response_headers(),
                refusal=refusal,
            )
        )
        await servers[-1].start()
        bundle = await asyncio.to_thread(certs.local, config.mode)
        source = "issued" if bundle.issued else "stored"
        return TlsState(ReloadableServerContext(bundle), source)
    assert config.acme_domain is not None and config.acme_email is not None
    acme = resolve_acme_settings(
        config.acme_domains or config.acme_domain,
        config.acme_email,
        config.env,
        challenge=config.challenge,
        dns_profile=config.dns_profile,
    )
    await asyncio.to_thread(certs.check_dns_profile, acme)
    challenges = ChallengeStore()
    # DNS-01 needs nothing from the HTTP port: it only redirects.
    redirect_host = next(
        (n for n in acme.all_names if not n.startswith("*")), acme.domain.removeprefix("*.")
    )
    servers.append(
        HttpServer(
            RedirectApp(
                config.https_port,
                redirect_host,
                challenges if acme.challenge == "http-01" else None,
            ),
            http_sock,
            headers=response_headers(),
            refusal=refusal,
        )
    )
    await servers[-1].start()
    outcome = await asyncio.to_thread(
        certs.acme_at_start,
        acme,
        challenges,
        port=config.port,
        egress=egress,
        progress=_terminal_progress(),
    )
    if outcome.source == "stored":
        notes.append(
            f"reused the stored certificate for {acme.domain} (valid until "
            f"{iso(outcome.bundle.not_after)})"
        )
    elif outcome.source == "stored-fallback":
        notes.append(
            f"certificate renewal failed: ACME failed ({outcome.error}); serving the "
            f"stored certificate for {acme.domain}, valid until "
            f"{iso(outcome.bundle.not_after)}"
        )
        await asyncio.to_thread(
            record_security_event,
            ctx.storage,
            EVENT_RENEWAL_FAILED,
            "medium",
            {
                "domain": acme.domain,
                "error": outcome.error,
                "fallback": "stored certificate",
                "certificate_expiry": iso(outcome.bundle.not_after),
            },
        )
    return TlsState(ReloadableServerContext(outcome.bundle), outcome.source, acme, challenges)


def _terminal_progress() -> Callable[[str], None] | None:
    """DNS-01 progress on stderr when it is a terminal (``--no-daemon`` in a shell); the
    daemon's stderr is its log file, where the solver logs the same steps."""
    if not sys.stderr.isatty():
        return None

    def show(message: str) -> None:
        sys.stderr.write(f"\r{message}\033[K")
        sys.stderr.flush()

    return show


async def decide_start_egress(
    ctx: Context, requested: EgressConfig, handle: str
) -> EffectiveEgress:
    """Probe the egress (3 tries) and record what happened; ``ProxyError`` when fail-closed."""
    from flm.egress.policy import decide_egress

    try:
        effective = await asyncio.to_thread(decide_egress, requested)
    except ProxyError as exc:
        details = exc.details if isinstance(exc.details, dict) else {}
        for event in details.get("events") or []:
            await asyncio.to_thread(
                record_security_event,
                ctx.storage,
                str(event["event_type"]),
                str(event["severity"]),
                {**event.get("details", {}), "handle": handle, "message": event.get("message")},
            )
        await asyncio.to_thread(
            record_security_event,
            ctx.storage,
            EVENT_EGRESS_REFUSED,
            "high",
            {
                "handle": handle,
                "mode": requested.mode,
                "endpoint": requested.socks5_endpoint,
                "action": "start_refused",
                "message": exc.message,
                "probe": details.get("probe"),
            },
        )
        raise
    for event in effective.events:
        await asyncio.to_thread(
            record_security_event,
            ctx.storage,
            event.event_type,
            event.severity,
            {**event.details, "handle": handle, "message": event.message},
        )
    return effective


def user_endpoints(s: ProxySettings, acme_domain: str | tuple[str, ...] | None = None) -> list[str]:
    """The URLs a user should use: localhost, or the LAN addresses when bound to all
    interfaces, or the bind address; ``https://domain`` for ACME (one per name)."""
    if s.https_port is not None and acme_domain:
        names = [acme_domain] if isinstance(acme_domain, str) else list(acme_domain)
        return [f"https://{n}:{s.https_port}" for n in names]
    scheme, port = ("https", s.https_port) if s.https_port is not None else ("http", s.port)
    if s.loopback_only:
        hosts = ["localhost"]
    elif s.bind in ("0.0.0.0", "::"):  # noqa: S104
        from flm.tls.lan import lan_addresses

        hosts = ["localhost", *lan_addresses()]
    else:
        hosts = [s.bind]
    return [f"{scheme}://{h if ':' not in h else '[' + h + ']'}:{port}" for h in hosts]


#: Proxies pick up policy, key, blocklist and engine changes at least this often.
RELOAD_INTERVAL_S = 30.0


_log_override: str | None = None


def apply_log_level(ctx: Any, override: str | None = None) -> str:
    """The log level on reload: the ``FLM_LOG_LEVEL`` a ``flm proxy reload`` was run with
    (remembered until the next one that names a level), else the ``log.level`` setting, else
    the level this process started with. Returns the level now in force."""
    global _log_override
    from flm.core.errors import ConfigNotSetError
    from flm.core.jsonlog import set_level, start_level

    if override:
        set_level(override)  # validates before remembering
        _log_override = override
    stored = None
    if _log_override is None:
        try:
            stored = ctx.config.value("log.level")
        except ConfigNotSetError:
            stored = None
    return set_level(_log_override or stored or start_level())


async def reload_proxies(
    ctx: Any, instances: list[ProxyInstance], log_level: str | None = None
) -> list[str]:
    """Apply the stored policy, keys, blocklist, profiles and engines to running proxies (the
    daemon's, or a ``--no-daemon`` one). A stored policy that no longer validates is refused:
    the one in force stays, and the proxy's ``last_error`` says why until a good one comes."""
    from flm.core.errors import PolicyInvalidError
    from flm.proxy.runtime import (
        _is_self,
        load_block_rows,
        load_profiles,
        pool_defs,
        scope_from_row,
    )
    from flm.services.api_keys import KeyService
    from flm.storage.usage import today_totals

    await asyncio.to_thread(apply_log_level, ctx, log_level)
    from flm.state import BackendDown

    for inst in instances:  # (shared keys, policy and blocks first: read below)
        shared = inst.runtime.shared
        if shared is not None and shared.available:
            with contextlib.suppress(BackendDown):
                await shared.sync()
    policy = await asyncio.to_thread(lambda: ctx.policy.show()["policy"])
    rows = [
        k for k in await asyncio.to_thread(KeyService(ctx.storage).list) if k.revoked_at is None
    ]
    active = {k.id for k in rows}
    scopes = {k.id: scope_from_row(k) for k in rows}
    endpoints = await asyncio.to_thread(ctx.engines.endpoints)
    replaced = [
        problem
        for db in (ctx.storage.config, ctx.storage.security)
        if (problem := db.identity_problem()) is not None
    ]
    reloaded = []
    for inst in instances:
        rt = inst.runtime
        if replaced:
            if inst.last_error != replaced[0]:
                log.error("%s", replaced[0])
            inst.last_error = replaced[0]
        try:
            rt.apply_policy(policy)
        except PolicyInvalidError as exc:
            inst.last_error = f"policy refused on reload: {exc.message}"
            log.warning("%s", inst.last_error)
        else:
            if inst.last_error and inst.last_error.startswith("policy refused"):
                inst.last_error = None
        from flm.proxy.health import watch_if_alerting

        # (worker 0 alone watches the engines for alerts; the getattr calls let a stand-in
        # with only runtime, settings and last_error be reloaded, as the test kit does)
        if not getattr(inst, "sibling", False):
            watch_if_alerting(rt)
        rt.keys.retain_only(active)
        rt.scopes = scopes  # (new limits, models and expiry apply from the next request)
        rt.ledger.retain_only(active)
        if rt.usage is not None:
            # this proxy's own usage reaches the rollups first, then today's totals (every
            # proxy's) replace the counters
            await asyncio.to_thread(rt.usage.flush)
            rt.ledger.load_today(await asyncio.to_thread(today_totals, ctx.storage.security))
        if rt.audit is not None:
            await asyncio.to_thread(rt.audit.flush)  # blocks made here reach the table
        if rt.shared is None or not rt.shared.available:  # (else synced above)
            rt.load_blocks(await asyncio.to_thread(load_block_rows, ctx, inst.settings.handle_id))
        await asyncio.to_thread(load_profiles, rt, ctx)
        gone = rt.engines.replace(e for e in endpoints if not _is_self(e, inst.settings))
        rt.engines.pools.replace(*await asyncio.to_thread(pool_defs, ctx))
        for adapter in gone:
            await adapter.close()
        workers = getattr(inst, "workers", None)
        if workers is not None:
            await workers.reload(log_level)
        reloaded.append(inst.settings.handle_id)
    return reloaded
