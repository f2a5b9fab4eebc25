"""Everything one running proxy needs, built once and swapped on reload."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from flm.core.alerts import AlertSettings
from flm.core.keyscope import KeyScope
from flm.core.models import EngineEndpoint
from flm.core.policy import EffectivePolicy
from flm.egress.config import EgressConfig
from flm.http.client import Timeouts
from flm.http.server import ConnectionLimits
from flm.proxy.alerts import Alerter
from flm.proxy.audit import AuditSink
from flm.proxy.engines import EngineRegistry
from flm.proxy.guard import GuardState, exempt_from_automatic_blocks
from flm.proxy.keys import KeyVerifier
from flm.proxy.metrics import Metrics
from flm.proxy.pools import Backoff, PoolDef
from flm.proxy.responses_store import ResponseStore
from flm.proxy.usage import KeyLedger, UsageSink

if TYPE_CHECKING:
    from flm.proxy.shared import SharedGuard


@dataclass(frozen=True)
class ProxySettings:
    port: int = 8080
    bind: str = "127.0.0.1"
    mode: str = "local-http"
    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout_s: float = 30.0
    handle_id: str = "proxy"
    https_port: int | None = None

    @property
    def loopback_only(self) -> bool:
        try:
            return ipaddress.ip_address(self.bind).is_loopback
        except ValueError:
            return self.bind == "localhost"


@dataclass
class ProxyRuntime:
    settings: ProxySettings
    engines: EngineRegistry
    keys: KeyVerifier
    metrics: Metrics = field(default_factory=Metrics)
    policy: dict[str, Any] = field(default_factory=dict)
    effective: EffectivePolicy = field(default_factory=EffectivePolicy)
    guard: GuardState = field(default_factory=GuardState)
    audit: AuditSink | None = None
    #: (engine, model) → default parameters (model profiles), and api id → prompt template.
    profiles: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    #: Background tasks started lazily by layers (e.g. the resource monitor); cancelled on close.
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: The egress in force (after the start-up probe: direct when fail-open fell back).
    egress: EgressConfig = field(default_factory=EgressConfig)
    #: Alert webhooks (policy ``alerts``), fed by the audit sink's events.
    alerts: Alerter | None = None
    #: Stored Responses API responses (per key, bounded, in memory).
    responses: ResponseStore = field(default_factory=ResponseStore)
    #: Active keys' scopes and limits by key id (loaded with the keys, swapped on reload).
    scopes: dict[str, KeyScope] = field(default_factory=dict)
    #: The live per-key counters (rate buckets, today's totals).
    ledger: KeyLedger = field(default_factory=KeyLedger)
    usage: UsageSink | None = None
    #: Reads one active key's scope from storage (for a key created since the last reload).
    scope_loader: Any = None
    #: Origins whose pages may call this proxy besides the policy's CORS list: the daemon's
    #: own web UI (its chat tester calls the proxy with the user's key like any client).
    ui_origins: tuple[str, ...] = ()
    #: The caps on this proxy's open connections, shared with its HTTP server.
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: The shared state backend (``--state-backend``), or None: this process's own state.
    shared: SharedGuard | None = None
    #: Requests being handled now, on every listener (the audit formats a request's record
    #: on the loop when it was the only one from start to end: see :mod:`flm.proxy.audit`).
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.connection_limits.privileged = self._privileged
        self._limit_connections()

    def _privileged(self, ip: str) -> bool:
        return exempt_from_automatic_blocks(ip, self.effective)

    def _limit_connections(self) -> None:
        limits, effective = self.connection_limits, self.effective
        limits.per_address = effective.connections_per_address
        limits.total = effective.connections_total
        limits.reserve = None

    def apply_policy(self, document: dict[str, Any]) -> None:
        """Swap in a new policy (validated: an invalid one raises and the old one stays)."""
        effective = EffectivePolicy.build(document, exposed=not self.settings.loopback_only)
        if self.ui_origins and "*" not in effective.allowed_origins:
            effective = replace(
                effective, allowed_origins=(*effective.allowed_origins, *self.ui_origins)
            )
        self.policy = document
        self.effective = effective
        if self.alerts is not None:
            self.alerts.configure(AlertSettings.from_policy(document.get("alerts")))
        self._limit_connections()

    def allow_ui_origins(self, origins: tuple[str, ...]) -> None:
        """Let the daemon's web UI (on these loopback origins) read this proxy's answers; kept
        across policy reloads."""
        self.ui_origins = origins
        self.apply_policy(self.policy)

    def load_blocks(self, rows: list[tuple[str, str, float | None, float, int]]) -> None:
        effective = self.effective
        self.guard.load_blocks(rows, lambda ip: exempt_from_automatic_blocks(ip, effective))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.engines.close()
        if self.shared is not None:
            await self.shared.close()
        if self.alerts is not None:
            await asyncio.to_thread(self.alerts.close)
        self.keys.close()
        if self.audit is not None:
            self.audit.close()
        if self.usage is not None:
            self.usage.close()

    async def scope_of(self, key_id: str) -> KeyScope | None:
        """The scope of an active key: from memory, or (a key created since the last
        reload) read once from storage, off the event loop."""
        scope = self.scopes.get(key_id)
        if scope is None and self.scope_loader is not None:
            scope = await asyncio.to_thread(self.scope_loader, key_id)
            if scope is not None:
                self.scopes[key_id] = scope
        return scope


def _is_self(endpoint: EngineEndpoint, settings: ProxySettings) -> bool:
    """An endpoint that is this proxy's own listener (llama.cpp and FLM share port 8080)."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint.base_url)
    if parts.port not in (settings.port, settings.https_port):
        return False
    host = parts.hostname or ""
    if host in ("localhost", settings.bind) or settings.bind in ("0.0.0.0", "::"):  # noqa: S104
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_runtime(
    settings: ProxySettings, ctx: Any, egress: EgressConfig | None = None
) -> ProxyRuntime:
    """Build a runtime from a ``flm.services.context.Context``; ``egress`` is the egress in
    force (default direct)."""
    from flm.services.api_keys import dummy_key_hash, verify_key_hash
    from flm.storage.security import ApiKeysRepo
    from flm.storage.usage import today_totals

    endpoints = [e for e in ctx.engines.endpoints() if not _is_self(e, settings)]
    timeouts: Timeouts = ctx.engines.timeouts()
    keys_repo = ApiKeysRepo(ctx.storage.security)
    runtime = ProxyRuntime(
        settings=settings,
        engines=EngineRegistry(endpoints, timeouts, egress),
        keys=KeyVerifier(keys_repo.hash_of, verify_key_hash, dummy_key_hash),
        egress=egress or EgressConfig(),
        audit=AuditSink(ctx.storage.security, ctx.paths.logs_dir / "audit.jsonl"),
        usage=UsageSink(ctx.storage.security),
    )
    if runtime.audit is not None:
        runtime.metrics.watch_audit(runtime.audit.status)
    if runtime.usage is not None:
        runtime.usage.on_tokens = runtime.metrics.record_key_tokens
    runtime.scope_loader = lambda key_id: load_scope(ctx, key_id)
    runtime.scopes = load_scopes(ctx)
    runtime.ledger.on_refusal = runtime.metrics.rate_limited.labels("key").inc
    runtime.ledger.load_today(today_totals(ctx.storage.security))
    from flm.services.audit_events import record_security_event

    storage = ctx.storage
    runtime.alerts = Alerter(
        lambda kind, severity, details: record_security_event(storage, kind, severity, details),
        egress=runtime.egress,
    )
    assert runtime.audit is not None
    runtime.audit.listener = runtime.alerts.offer
    runtime.apply_policy(json.loads(json.dumps(ctx.policy.show()["policy"])))
    runtime.load_blocks(load_block_rows(ctx, settings.handle_id))
    load_profiles(runtime, ctx)
    runtime.engines.pools.replace(*pool_defs(ctx))
    runtime.metrics.watch_pools(runtime.engines.pools.snapshot)
    runtime.metrics.watch_state(
        lambda: runtime.shared.describe() if runtime.shared is not None else {"backend": "local"}
    )
    return runtime


def scope_from_row(row: Any) -> KeyScope:
    """A stored key (:class:`flm.storage.security.ApiKeyRow`) as the hot path checks it."""
    from flm.core.timeutil import parse_iso

    lim = row.limits
    return KeyScope(
        row.id,
        row.label,
        None if lim.models is None else tuple(lim.models),
        lim.rpm,
        lim.burst,
        lim.tpm,
        lim.daily_tokens,
        lim.daily_requests,
        parse_iso(lim.expires_at).timestamp() if lim.expires_at else None,
        lim.read_only,
    )


def load_scopes(ctx: Any) -> dict[str, KeyScope]:
    """Every active key's scope."""
    from flm.storage.security import ApiKeysRepo

    return {
        row.id: scope_from_row(row)
        for row in ApiKeysRepo(ctx.storage.security).all(include_revoked=False)
    }


def load_scope(ctx: Any, key_id: str) -> KeyScope | None:
    from flm.storage.security import ApiKeysRepo

    row = ApiKeysRepo(ctx.storage.security).get(key_id)
    return scope_from_row(row) if row is not None and row.revoked_at is None else None


def pool_defs(ctx: Any) -> tuple[list[PoolDef], Backoff]:
    """Engine pools and their back-off settings from config.db (read off the event loop;
    the loop applies them with ``runtime.engines.pools.replace``)."""
    backoff = Backoff(
        float(ctx.config.value("pool.backoff_initial_s")),
        float(ctx.config.value("pool.backoff_max_s")),
    )
    return [PoolDef(p.name, p.members) for p in ctx.engines.pools()], backoff


def load_profiles(runtime: ProxyRuntime, ctx: Any) -> None:
    """Model profiles, API prompts and model aliases from config.db into the runtime."""
    from flm.services.aliases import AliasService
    from flm.services.profiles import ProfileService

    service = ProfileService(ctx.storage)
    runtime.profiles = service.effective_profiles()
    runtime.prompts = service.effective_prompts()
    runtime.engines.set_aliases(AliasService(ctx.storage).effective())
    runtime.responses.configure(
        float(ctx.config.value("responses.retention_s")),
        int(ctx.config.value("responses.max_per_key")),
    )


def load_block_rows(ctx: Any, listener: str) -> list[tuple[str, str, float | None, float, int]]:
    """Persisted blocks and failure counts from security.db that apply to ``listener`` (a
    proxy's handle id): its own and the shared ones (``'*'``)."""
    from flm.core.timeutil import parse_iso
    from flm.storage.records import BlocklistRepo

    rows = BlocklistRepo(ctx.storage.security).all(newest_first=False, listener=listener)
    out: list[tuple[str, str, float | None, float, int]] = []
    for r in rows:
        until = (
            None
            if r["permanent"]
            else (parse_iso(r["expires_at"]).timestamp() if r["expires_at"] else 0.0)
        )
        out.append(
            (
                r["ip"],
                r["reason"],
                until,
                parse_iso(r["blocked_at"]).timestamp(),
                int(r["failure_count"]),
            )
        )
    return out
