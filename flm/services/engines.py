"""Engines as the rest of FLM sees them: endpoints, detection with a cache, models."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flm.core.errors import (
    EngineError,
    EngineNotFoundError,
    FlmError,
    NotFoundError,
    UsageError,
)
from flm.core.models import (
    EngineEndpoint,
    EngineKind,
    EngineState,
    EngineStatus,
    ModelInfo,
)
from flm.engines import kinds
from flm.http.client import Timeouts
from flm.services.settings import ConfigService
from flm.storage import Storage
from flm.storage.config_db import EngineCacheRepo, EngineRow, EnginesRepo, PoolRow, PoolsRepo

CACHE_TTL_S = 300.0
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class EngineExistsError(FlmError):
    code = "ENGINE_ALREADY_REGISTERED"


class PoolExistsError(FlmError):
    code = "POOL_EXISTS"


def normalize_url(text: str, *, default_port: int | None = None) -> str:
    """``host``, ``host:port`` or ``http(s)://host:port[/path]`` → ``scheme://host:port[/path]``.
    A wildcard listen address (``0.0.0.0``, ``::``) becomes the matching loopback address."""
    raw = text.strip()
    if not raw:
        raise UsageError("empty engine URL")
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"malformed engine URL {text!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"engine URL must be http:// or https://, got {text!r}")
    host = parts.hostname
    if not host or parts.username or parts.password or parts.query or parts.fragment:
        raise UsageError(f"malformed engine URL {text!r} (need scheme://host[:port][/path])")
    if not re.fullmatch(r"[A-Za-z0-9.\-:]+", host):
        raise UsageError(f"malformed host in engine URL {text!r}")
    if host in ("0.0.0.0", "::"):  # noqa: S104 - mapping a wildcard bind to loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    port = port or default_port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{shown}:{port}{path}"


def default_endpoints(env: Mapping[str, str] | None = None) -> list[EngineEndpoint]:
    """The conventional endpoint of each kind, with the engines' own env overrides (an
    address in the kind's ``host_env``, a port in its ``port_env``)."""
    env = os.environ if env is None else env
    out = []
    for kind in kinds.all_kinds():
        host, port = kind.default_host, kind.default_port
        url = f"http://{host}:{port}"
        address = env.get(kind.host_env) if kind.host_env else None
        port_text = env.get(kind.port_env) if kind.port_env else None
        try:
            if address or port_text:
                url = normalize_url(address or host, default_port=int(port_text or port))
        except (UsageError, ValueError):
            pass  # a broken override falls back to the default endpoint
        out.append(EngineEndpoint(str(kind.name), kind.name, url, "default"))
    return out


def parse_kind(text: str) -> EngineKind:
    return kinds.parse_kind(text)


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class DetectReport:
    engines: list[EngineState]
    cached: bool
    not_found: list[str] = field(default_factory=list)
    flm_listeners: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engines": [e.to_dict() for e in self.engines],
            "cached": self.cached,
            "not_found": self.not_found,
            "flm_listeners": self.flm_listeners,
        }


class EngineService:
    def __init__(
        self, storage: Storage, config: ConfigService, env: Mapping[str, str] | None = None
    ) -> None:
        self._storage = storage
        self._config = config
        self._env = os.environ if env is None else env

    # --- endpoints ----------------------------------------------------------------------------

    def registered(self) -> list[EngineRow]:
        return EnginesRepo(self._storage.config).all()

    def endpoints(self) -> list[EngineEndpoint]:
        """Registered engines plus each kind's default endpoint (a registered engine with the
        kind's own id replaces the default)."""
        rows = self.registered()
        taken = {r.id for r in rows}
        out = [e for e in default_endpoints(self._env) if e.id not in taken]
        for row in rows:
            if row.enabled:
                out.append(
                    EngineEndpoint(
                        row.id,
                        EngineKind(row.kind),
                        row.base_url,
                        "managed" if row.managed else "registered",
                        api_key=row.api_key,
                    )
                )
        return out

    def endpoint(self, engine_id: str) -> EngineEndpoint:
        for e in self.endpoints():
            if e.id == engine_id:
                return e
        raise EngineNotFoundError(f"no engine with id {engine_id!r}")

    def add(
        self,
        kind: str,
        url: str,
        engine_id: str | None = None,
        *,
        managed: bool = False,
        pid: int | None = None,
        model_path: str | None = None,
        api_key: str | None = None,
    ) -> EngineRow:
        parsed_kind = parse_kind(kind)
        base_url = normalize_url(url, default_port=kinds.get(parsed_kind).default_port)
        registered = self.registered()
        if not managed:
            same = next(
                (r for r in registered if r.kind == parsed_kind.value and r.base_url == base_url),
                None,
            )
            if same is not None:
                if engine_id in (None, same.id):
                    return same  # adding it again reuses it (no vllm-2 for the same server)
                raise EngineExistsError(
                    f"{base_url} is already registered as {same.id!r}; "
                    f"remove it first to register it as {engine_id!r}"
                )
        taken = {r.id for r in registered}
        if engine_id is None:
            engine_id = parsed_kind.value
            n = 2
            while engine_id in taken:
                engine_id = f"{parsed_kind.value}-{n}"
                n += 1
        elif not _ID.match(engine_id):
            raise UsageError(
                f"engine id {engine_id!r} must be lowercase letters, digits, "
                "'-' or '_' (at most 64, starting with a letter or digit)"
            )
        elif engine_id in taken:
            raise EngineExistsError(f"an engine with id {engine_id!r} is already registered")
        repo = EnginesRepo(self._storage.config)
        try:
            row = repo.add(
                engine_id,
                parsed_kind.value,
                base_url,
                managed=managed,
                pid=pid,
                model_path=model_path,
                api_key=api_key,
            )
        except FlmError as exc:
            if "UNIQUE" in exc.message:
                raise EngineExistsError(
                    f"an engine with id {engine_id!r} is already registered"
                ) from None
            raise
        EngineCacheRepo(self._storage.config).replace({}, time.time())
        return row

    def remove(self, engine_id: str) -> EngineRow:
        repo = EnginesRepo(self._storage.config)
        row = repo.get(engine_id)
        if row is None or not repo.remove(engine_id):
            raise EngineNotFoundError(f"no registered engine with id {engine_id!r}")
        return row

    # --- pools ---------------------------------------------------------------------------------

    def pools(self) -> list[PoolRow]:
        return PoolsRepo(self._storage.config).all()

    def add_pool(
        self, name: str, members: list[str], weights: Mapping[str, float] | None = None
    ) -> PoolRow:
        """A pool of ``members`` (engine ids, each at most once, at least one); ``weights``
        scale a member's share (default 1). Requests reach it as ``flm://pool:NAME/model``."""
        if not _ID.match(name):
            raise UsageError(
                f"pool name {name!r} must be lowercase letters, digits, '-' or '_' "
                "(at most 64, starting with a letter or digit)"
            )
        if not members:
            raise UsageError("a pool needs at least one --member")
        if len(set(members)) != len(members):
            raise UsageError("a member is named twice")
        known = {e.id for e in self.endpoints()}
        unknown = [m for m in members if m not in known]
        if unknown:
            raise EngineNotFoundError(f"no engine with id {', '.join(map(repr, unknown))}")
        weights = dict(weights or {})
        stray = [w for w in weights if w not in members]
        if stray:
            raise UsageError(f"--weight names {', '.join(stray)}, which is not a --member")
        for engine_id, weight in weights.items():
            if not 0 < weight <= 1000:
                raise UsageError(f"weight of {engine_id} must be > 0 and <= 1000")
        row = PoolsRepo(self._storage.config).add(
            name, [(m, float(weights.get(m, 1.0))) for m in members]
        )
        if row is None:
            raise PoolExistsError(f"a pool named {name!r} exists")
        return row

    def remove_pool(self, name: str) -> None:
        if not PoolsRepo(self._storage.config).remove(name):
            raise NotFoundError(f"no pool named {name!r}")

    # --- detection ----------------------------------------------------------------------------

    def timeouts(self) -> Timeouts:
        return Timeouts(
            connect_s=float(self._config.value("engine.connect_timeout_s")),
            first_byte_s=float(self._config.value("engine.first_byte_timeout_s")),
            idle_s=float(self._config.value("engine.idle_timeout_s")),
        )

    def _settings(self) -> Any:
        from flm.engines.detect import DetectSettings

        return DetectSettings(
            threshold_ms=float(self._config.value("engine.health_latency_threshold_ms")),
            max_failures=int(self._config.value("engine.max_network_failures")),
        )

    def _select(self, which: str | None) -> list[EngineEndpoint]:
        endpoints = self.endpoints()
        if which is None:
            return endpoints
        chosen = [e for e in endpoints if e.id == which or e.kind.value == which]
        if not chosen:
            if which in kinds.names():
                return []
            raise EngineNotFoundError(f"no engine or engine kind {which!r}")
        return chosen

    def detect(self, which: str | None = None, *, fresh: bool = False) -> DetectReport:
        return asyncio.run(self.adetect(which, fresh=fresh))

    async def adetect(self, which: str | None = None, *, fresh: bool = False) -> DetectReport:
        from flm.engines.detect import detect_all

        endpoints = self._select(which)
        cache = EngineCacheRepo(self._storage.config)
        now = time.time()
        if not fresh:
            cached = cache.all()
            states: list[EngineState] = []
            hit = True
            for e in endpoints:
                entry = cached.get(e.id)
                if entry is None or now - entry[1] > CACHE_TTL_S:
                    hit = False
                    break
                data = json.loads(entry[0])
                if data.get("base_url") != e.base_url:
                    hit = False
                    break
                if data.get("status") is not None:
                    states.append(EngineState.from_dict(data))
            if hit and endpoints:
                return self._report(
                    states,
                    endpoints,
                    cached=True,
                    listeners=[
                        e.id for e in endpoints if json.loads(cached[e.id][0]).get("status") is None
                    ],
                )
        results = await detect_all(endpoints, self._settings(), self.timeouts(), self._env)
        listeners = [e.id for e, s in zip(endpoints, results, strict=True) if s is None]
        found = [s for s in results if s is not None]
        previous = {k: v for k, v in cache.all().items() if now - v[1] <= CACHE_TTL_S}
        merged = {k: v[0] for k, v in previous.items()}
        for e, s in zip(endpoints, results, strict=True):
            merged[e.id] = json.dumps(
                s.to_dict() if s else {"base_url": e.base_url, "status": None}
            )
        # A read-only (safe mode) database still detects; it just cannot cache.
        with contextlib.suppress(FlmError):
            cache.replace(merged, now)
        return self._report(found, endpoints, cached=False, listeners=listeners)

    @staticmethod
    def _report(
        states: list[EngineState],
        endpoints: list[EngineEndpoint],
        *,
        cached: bool,
        listeners: list[str],
    ) -> DetectReport:
        shown = [
            s for s in states if s.source != "default" or s.status != EngineStatus.ERROR_NETWORK
        ]
        missing = [s.id for s in states if s not in shown]
        return DetectReport(shown, cached, not_found=missing, flm_listeners=listeners)

    # --- models -------------------------------------------------------------------------------

    async def alist_models(
        self, engine_id: str | None = None, fresh: bool = False
    ) -> tuple[list[ModelInfo], dict[str, str]]:
        from flm.engines.kinds import make_adapter

        report = await self.adetect(engine_id, fresh=fresh)
        usable = [s for s in report.engines if s.status.usable]
        if engine_id is not None and not usable:
            states = {s.id: s for s in report.engines}
            state = states.get(engine_id)
            reason = f"{state.status.value}: {state.error}" if state else "not running"
            raise EngineNotFoundError(f"engine {engine_id!r} is not usable ({reason})")
        timeouts = self.timeouts()
        endpoints = {e.id: e for e in self.endpoints()}
        adapters = [
            make_adapter(
                endpoints.get(s.id) or EngineEndpoint(s.id, s.kind, s.base_url, s.source), timeouts
            )
            for s in usable
        ]
        errors: dict[str, str] = {}
        models: list[ModelInfo] = []
        try:
            results = await asyncio.gather(
                *(a.list_models() for a in adapters), return_exceptions=True
            )
        finally:
            await asyncio.gather(*(a.close() for a in adapters), return_exceptions=True)
        for adapter, result in zip(adapters, results, strict=True):
            if isinstance(result, EngineError):
                errors[adapter.id] = result.message
            elif isinstance(result, BaseException):
                raise result
            else:
                models.extend(result)
        return models, errors

    def list_models(self, engine_id: str | None = None) -> tuple[list[ModelInfo], dict[str, str]]:
        return asyncio.run(self.alist_models(engine_id))
