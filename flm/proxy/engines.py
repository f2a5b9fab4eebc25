"""The engines one proxy forwards to: pooled adapters and a short-lived model cache.

Only endpoints handed in at build/reload time exist here; nothing a request says can add a
host, so the proxy never forwards to a URL taken from a request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import replace as with_changes
from typing import TYPE_CHECKING

from flm.core.errors import EngineError
from flm.core.memo import remember
from flm.core.models import MODEL_SCHEME, Capabilities, EngineEndpoint, ModelInfo, split_model_id
from flm.engines.base import EngineAdapter
from flm.engines.kinds import make_adapter
from flm.http.client import EngineClient, Timeouts
from flm.openai.errors import HttpError, http_status
from flm.proxy.pools import POOL_PREFIX, PoolAdapter, PoolSet

if TYPE_CHECKING:
    from flm.egress.config import EgressConfig

MODELS_TTL_S = 30.0
#: A request for a model the cached list lacks refreshes the list only if it is at least this
#: old: a model pulled a moment ago is found, and a client naming unknown models cannot make
#: every request cost the engine a full listing (Ollama: one ``/api/show`` per model).
MISS_REFRESH_S = 1.0


class EngineRegistry:
    """``egress``: the egress in force (SPEC §7). Remote engines get an HTTP client whose
    connections go through it; loopback engines always connect directly."""

    def __init__(
        self,
        endpoints: Iterable[EngineEndpoint],
        timeouts: Timeouts,
        egress: EgressConfig | None = None,
    ) -> None:
        self._timeouts = timeouts
        self._egress = egress
        self._adapters: dict[str, EngineAdapter] = {}
        self._models: dict[str, tuple[float, dict[str, ModelInfo]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: (engine, model name) → (the ModelInfo they were worked out for, capabilities).
        self._caps: dict[tuple[str, str], tuple[ModelInfo, Capabilities]] = {}
        #: Engine pools (``flm://pool:NAME/model``), set by the runtime's build and reload.
        self.pools = PoolSet(self)
        self._pool_adapters: dict[str, PoolAdapter] = {}
        #: alias → (engine, model), set from config.db at start and on every reload.
        self.aliases: dict[str, tuple[str, str]] = {}
        #: plain model name → the engines that serve it, rebuilt whenever a model list is
        #: stored, so that resolving a plain name costs one lookup.
        self._by_name: dict[str, tuple[str, ...]] = {}
        #: When every engine's list was last fetched because a plain name was not found.
        self._gathered_at = -MISS_REFRESH_S
        self.replace(endpoints)

    def replace(self, endpoints: Iterable[EngineEndpoint]) -> list[EngineAdapter]:
        """Swap the endpoint set; returns adapters that went away (the caller closes them)."""
        fresh = {e.id: e for e in endpoints}
        gone = [a for i, a in self._adapters.items() if i not in fresh or a.endpoint != fresh[i]]
        kept = {i: a for i, a in self._adapters.items() if a not in gone}
        for engine_id, endpoint in fresh.items():
            if engine_id not in kept:
                kept[engine_id] = make_adapter(endpoint, self._timeouts, self._client_for(endpoint))
        self._adapters = kept
        self._models = {k: v for k, v in self._models.items() if k in kept}
        self._caps = {}
        self._index()
        return gone

    def set_aliases(self, aliases: dict[str, str]) -> None:
        """Swap in the aliases (name → ``flm://`` id); malformed targets are skipped."""
        parsed = {}
        for name, target in aliases.items():
            parts = split_model_id(target)
            if parts is not None:
                parsed[name] = parts
        self.aliases = parsed

    def _index(self) -> None:
        by_name: dict[str, dict[str, None]] = {}
        for engine_id, (_at, models) in self._models.items():
            for name in models:
                by_name.setdefault(name, {})[engine_id] = None
                if name.endswith(":latest"):  # Ollama's implicit tag
                    by_name.setdefault(name[: -len(":latest")], {})[engine_id] = None
        self._by_name = {name: tuple(engines) for name, engines in by_name.items()}

    def plain_names(self) -> dict[str, str]:
        """Plain names exactly one engine serves → that engine (for ``/v1/models``)."""
        return {name: engines[0] for name, engines in self._by_name.items() if len(engines) == 1}

    async def locate(self, value: str) -> tuple[str, str]:
        """``(engine, model)`` for what a request names: an ``flm://`` id, an alias, or a plain
        model name that exactly one engine serves (several → 400 naming them; none → 404
        ``model_not_found``). An alias wins over a plain name it shadows."""
        parts = split_model_id(value)
        if parts is not None:
            return parts
        hit = self.aliases.get(value)
        if hit is not None:
            return hit
        if value.startswith(MODEL_SCHEME):
            raise HttpError(
                400,
                "invalid_model",
                f"model must look like flm://<engine>/<model>, got {value[:200]!r}",
            )
        engines = self._by_name.get(value)
        if engines is None and time.monotonic() - self._gathered_at >= MISS_REFRESH_S:
            # a name no list holds: ask every engine again (at most once a second), so a model
            # pulled a moment ago is found and unknown names cannot cost a listing each
            self._gathered_at = time.monotonic()
            await asyncio.gather(
                *(self.models_of(i, refresh=True) for i in self._adapters), return_exceptions=True
            )
            engines = self._by_name.get(value)
        if not engines:
            raise HttpError(
                404,
                "model_not_found",
                f"no engine serves a model named {value[:200]!r} (see /v1/models)",
            )
        if len(engines) > 1:
            ids = ", ".join(f"{MODEL_SCHEME}{e}/{value}" for e in engines)
            raise HttpError(
                400,
                "ambiguous_model",
                f"several engines serve {value[:200]!r}: use one of {ids}, or "
                "name one with `flm models alias set`",
            )
        return engines[0], value

    def _client_for(self, endpoint: EngineEndpoint) -> EngineClient | None:
        """``None`` (the adapter's own direct client) unless the engine is remote and egress goes
        through a SOCKS proxy."""
        egress = self._egress
        if egress is None or not egress.uses_proxy:
            return None
        from flm.egress.config import is_loopback_target

        if is_loopback_target(endpoint.base_url):
            return None
        from flm.egress.connector import opener_for

        url = endpoint.base_url
        return EngineClient(
            url,
            self._timeouts,
            opener=opener_for(egress, url),
            api_key=endpoint.api_key,
            name=endpoint.id,
        )

    def ids(self) -> list[str]:
        return list(self._adapters)

    def adapter(self, engine_id: str) -> EngineAdapter:
        adapter = self._adapters.get(engine_id)
        if adapter is None:
            raise HttpError(404, "not_found", f"no engine {engine_id!r}")
        return adapter

    async def detected_adapter(self, engine_id: str) -> EngineAdapter:
        """The adapter of an engine the proxy may forward to as it is (the pass-through): a
        registered or managed engine, or a kind's default endpoint only while something there
        answers the kind's model list as that engine does (SPEC §3.1: registered or detected
        hosts only; a port that merely listens is not an engine)."""
        adapter = self.adapter(engine_id)
        if adapter.endpoint.source == "default":
            try:
                await self.models_of(engine_id)
            except (EngineError, HttpError):
                raise HttpError(404, "not_found", f"no engine {engine_id!r}") from None
        return adapter

    async def models_of(self, engine_id: str, *, refresh: bool = False) -> dict[str, ModelInfo]:
        adapter = self.adapter(engine_id)
        cached = self._models.get(engine_id)
        now = time.monotonic()
        if cached is not None and not refresh and now - cached[0] < MODELS_TTL_S:
            return cached[1]
        lock = self._locks.setdefault(engine_id, asyncio.Lock())
        async with lock:
            cached = self._models.get(engine_id)
            if cached is not None and cached[0] >= now:
                return cached[1]  # listed while this call waited for the lock
            models = {m.name: m for m in await adapter.list_models()}
            if engine_id in self._adapters:  # (not removed by a reload meanwhile)
                self._models[engine_id] = (time.monotonic(), models)
                self._index()
            return models

    async def resolve(self, engine_id: str, model: str) -> tuple[EngineAdapter, ModelInfo]:
        if engine_id.startswith(POOL_PREFIX):
            return await self._resolve_pool(engine_id, model)
        adapter = self._adapters.get(engine_id)
        if adapter is None:
            raise HttpError(404, "model_not_found", f"no engine {engine_id[:100]!r}")
        cached = self._models.get(engine_id)
        if cached is not None and time.monotonic() - cached[0] < MODELS_TTL_S:
            hit = cached[1].get(model)
            if hit is not None:
                return adapter, hit  # the hot path: no await, no lookup beyond two dicts
        try:
            models = await self.models_of(engine_id)
            listed = self._models.get(engine_id)
            if _find(models, model) is None and (
                listed is None or time.monotonic() - listed[0] >= MISS_REFRESH_S
            ):
                models = await self.models_of(engine_id, refresh=True)
        except EngineError as exc:
            status, code = http_status(exc)
            if status == 404:  # (the engine has no model list: it is not usable)
                status, code = 503, "engine_unavailable"
            raise HttpError(
                status, code, f"engine {engine_id} is unavailable: {exc.message}"
            ) from exc
        info = _find(models, model)
        if info is None:
            raise HttpError(
                404, "model_not_found", f"engine {engine_id} has no model {model[:200]!r}"
            )
        return adapter, info

    async def _resolve_pool(self, pool_id: str, model: str) -> tuple[EngineAdapter, ModelInfo]:
        """A pool's adapter and the model as its first healthy member that lists it knows it
        (its capabilities are that member's: the members of a pool serve the same model)."""
        pool = self.pools.get(pool_id)
        if pool is None:
            raise HttpError(404, "not_found", f"no pool {pool_id[len(POOL_PREFIX) :]!r}")
        failure: HttpError | None = None
        for member in pool.healthy():
            if member.engine_id not in self._adapters:
                continue
            try:
                _adapter, info = await self.resolve(member.engine_id, model)
            except HttpError as exc:
                failure = failure if failure is not None and failure.status == 404 else exc
                continue
            caps = self.capabilities(member.engine_id, info)
            adapter = self._pool_adapters.get(pool_id)
            if adapter is None or not adapter.serves(pool, caps):
                adapter = PoolAdapter(self.pools, pool, caps)
                remember(self._pool_adapters, pool_id, adapter)
            return adapter, info
        if failure is not None and failure.status == 404:
            raise HttpError(404, "not_found", f"pool {pool.name} has no model {model!r}")
        raise HttpError(503, "engine_unavailable", f"pool {pool.name} has no healthy member")

    def capabilities(self, engine_id: str, info: ModelInfo | None) -> Capabilities:
        """What the engine can do with this model; remembered for the ``info`` it was worked
        out for (a refreshed model list brings new ``ModelInfo`` objects)."""
        if engine_id.startswith(POOL_PREFIX):
            pool = self.pools.get(engine_id)
            if info is not None:
                engine_id = info.engine_id  # (the member that resolved the model)
            elif pool is not None and pool.members:
                engine_id = pool.members[0].engine_id
        if info is None:
            return self._capabilities(engine_id, None)
        key = (engine_id, info.name)
        hit = self._caps.get(key)
        if hit is not None and hit[0] is info:
            return hit[1]
        caps = self._capabilities(engine_id, info)
        remember(self._caps, key, (info, caps))
        return caps

    def _capabilities(self, engine_id: str, info: ModelInfo | None) -> Capabilities:
        caps = self.adapter(engine_id).capabilities()
        if info is not None and info.vision and not caps.vision_inputs:
            caps = caps.merged(vision_inputs=True)
        if (
            info is not None
            and caps.vision_inputs
            and (
                info.details.get("type") == "llm"
                or ("capabilities" in info.details and not info.vision)
            )
        ):
            # LM Studio's type and Ollama's capabilities say exactly which models see
            caps = caps.merged(vision_inputs=False)
        return caps

    async def all_models(self) -> list[ModelInfo]:
        results = await asyncio.gather(
            *(self.models_of(i) for i in self._adapters), return_exceptions=True
        )
        out: list[ModelInfo] = []
        for result in results:
            if isinstance(result, dict):
                out.extend(result.values())
            elif not isinstance(result, EngineError | HttpError):
                raise result
        return out + self._pool_models(out)

    def _pool_models(self, listed: list[ModelInfo]) -> list[ModelInfo]:
        """Each pool's models: those every member with a model list serves (members that
        could not be listed do not narrow it)."""
        by_engine: dict[str, dict[str, ModelInfo]] = {}
        for m in listed:
            by_engine.setdefault(m.engine_id, {})[m.name] = m
        out: list[ModelInfo] = []
        for pool in self.pools.pools.values():
            lists = [by_engine[m.engine_id] for m in pool.members if m.engine_id in by_engine]
            if not lists:
                continue
            shared = set(lists[0]).intersection(*lists[1:])
            out.extend(with_changes(lists[0][name], engine_id=pool.id) for name in sorted(shared))
        return out

    async def close(self) -> None:
        await self.pools.close()
        await asyncio.gather(*(a.close() for a in self._adapters.values()), return_exceptions=True)


def _find(models: dict[str, ModelInfo], model: str) -> ModelInfo | None:
    info = models.get(model)
    if info is None and ":" not in model:
        info = models.get(f"{model}:latest")  # Ollama's implicit tag
    return info
