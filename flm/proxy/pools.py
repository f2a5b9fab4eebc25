"""Engine pools: several engines serving the same models, addressed as one model id,
``flm://pool:NAME/model``.

A request goes to the least-busy healthy member: the one with the fewest requests in flight
per unit of weight, ties broken by a smooth weighted round robin (so members that are equally
busy take turns in proportion to their weights). Picking is two passes over the members,
with no lock (everything runs on the proxy's event loop). The in-flight count of a member
goes up when a request is handed to it and down in a ``finally`` on every path out (reply,
engine error, client disconnect, stream end), so it cannot drift.

A member that fails (cannot be reached, times out, or answers 5xx/429/503) is taken out of
rotation; a background probe lists its models after a back-off that doubles at each failed
probe (``pool.backoff_initial_s`` up to ``pool.backoff_max_s``) and puts it back when it answers.
Client requests are never used as probes. A request that fails on one member before any byte
reached the client is retried once on another member; once the first byte of a stream is on
its way, a failure ends the stream (the caller sends the error event and ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from flm.core.errors import (
    EngineApiError,
    EngineError,
    EngineNetworkError,
    EngineNotFoundError,
    EngineRequestRejectedError,
    EngineTimeoutError,
)
from flm.core.models import Capabilities, EngineEndpoint, EngineKind
from flm.engines.base import EngineAdapter, Health

if TYPE_CHECKING:
    from flm.core.models import ModelInfo
    from flm.proxy.engines import EngineRegistry

log = logging.getLogger("flm.proxy")

#: ``flm://pool:NAME/model``: the engine part of a pool's model ids starts with this (engine ids
#: cannot contain ``:``, so the two never collide).
POOL_PREFIX = "pool:"
#: The longest a probe waits for a member's model list.
PROBE_TIMEOUT_S = 5.0

T = TypeVar("T")


@dataclass(frozen=True)
class PoolDef:
    """A pool as stored: name and ``(engine_id, weight)`` members."""

    name: str
    members: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    max_s: float = 30.0

    def after(self, failures: int) -> float:
        return min(self.initial_s * float(2 ** min(max(failures - 1, 0), 30)), self.max_s)


class Member:
    __slots__ = ("credit", "engine_id", "failures", "in_flight", "retry_at", "up", "weight")

    def __init__(self, engine_id: str, weight: float) -> None:
        self.engine_id = engine_id
        self.weight = weight
        self.in_flight = 0
        #: The weighted round robin's running credit (see ``Pool.pick``).
        self.credit = 0.0
        self.up = True
        #: Consecutive failures (the request that took it out, then failed probes).
        self.failures = 0
        #: When (monotonic) the next probe is due while the member is out.
        self.retry_at = 0.0

    @property
    def state(self) -> str:
        return "up" if self.up else "down"


class Pool:
    def __init__(self, name: str, members: list[Member]) -> None:
        self.name = name
        self.members = members

    @property
    def id(self) -> str:
        return POOL_PREFIX + self.name

    def pick(self, exclude: Member | None = None) -> Member | None:
        """The healthy member with the fewest requests in flight per unit of weight. Ties
        (always the case when requests come one at a time) go by smooth weighted round
        robin: each tied member earns its weight in credit, the richest is chosen and pays
        the tied members' total, so shares follow the weights exactly. Two passes over the
        members, no allocation."""
        best_load = -1.0
        for member in self.members:
            if member.up and member is not exclude:
                load = member.in_flight / member.weight
                if best_load < 0 or load < best_load:
                    best_load = load
        if best_load < 0:
            return None
        chosen: Member | None = None
        total = 0.0
        for member in self.members:
            if (
                member.up
                and member is not exclude
                and member.in_flight / member.weight == best_load
            ):
                member.credit += member.weight
                total += member.weight
                if chosen is None or member.credit > chosen.credit:
                    chosen = member
        assert chosen is not None
        chosen.credit -= total
        return chosen

    def healthy(self) -> list[Member]:
        return [m for m in self.members if m.up]


def is_member_failure(exc: EngineError) -> bool:
    """An error that says the member is unwell (not that the request was wrong)."""
    if isinstance(exc, EngineNetworkError | EngineTimeoutError):
        return True
    if isinstance(exc, EngineRequestRejectedError | EngineNotFoundError):
        return False
    if isinstance(exc, EngineApiError):
        details = exc.details if isinstance(exc.details, dict) else {}
        status = details.get("upstream_status")
        return isinstance(status, int) and status >= 500
    return False


def _worth_retrying(exc: EngineError) -> bool:
    # (a member that lacks the model answers 404: another member may have it)
    return is_member_failure(exc) or isinstance(exc, EngineNotFoundError)


class PoolSet:
    """The pools of one proxy, their members' health, and the probe task."""

    def __init__(self, registry: EngineRegistry, backoff: Backoff | None = None) -> None:
        self._registry = registry
        self.backoff = backoff or Backoff()
        self.pools: dict[str, Pool] = {}
        self._probe: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    def replace(self, defs: Iterable[PoolDef], backoff: Backoff | None = None) -> None:
        """Swap the pool set; a member that stays keeps its health and in-flight count. A
        member whose engine this proxy does not know (removed since) is left out."""
        if backoff is not None:
            self.backoff = backoff
        known = set(self._registry.ids())
        old = {(p.name, m.engine_id): m for p in self.pools.values() for m in p.members}
        fresh: dict[str, Pool] = {}
        for d in defs:
            members = []
            for engine_id, weight in d.members:
                if engine_id not in known:
                    continue
                member = old.get((d.name, engine_id)) or Member(engine_id, weight)
                member.weight = weight
                members.append(member)
            fresh[POOL_PREFIX + d.name] = Pool(d.name, members)
        self.pools = fresh

    def get(self, pool_id: str) -> Pool | None:
        return self.pools.get(pool_id)

    def snapshot(self) -> list[dict[str, Any]]:
        """Each pool with its members' state (``flm proxy status``, the admin API)."""
        return [
            {
                "name": p.name,
                "model_id": f"flm://{p.id}/<model>",
                "members": [
                    {
                        "engine_id": m.engine_id,
                        "weight": m.weight,
                        "state": m.state,
                        "in_flight": m.in_flight,
                        "failures": m.failures,
                    }
                    for m in p.members
                ],
            }
            for p in self.pools.values()
        ]

    # --- health -------------------------------------------------------------------------------

    def mark_down(self, member: Member, reason: str) -> None:
        member.failures += 1
        member.retry_at = time.monotonic() + self.backoff.after(member.failures)
        if member.up:
            member.up = False
            log.warning("pool member %s taken out of rotation: %s", member.engine_id, reason[:200])
        self._ensure_probe()

    def _ensure_probe(self) -> None:
        if self._wake is not None:
            self._wake.set()
        if self._probe is None or self._probe.done():
            self._wake = asyncio.Event()
            self._probe = asyncio.ensure_future(self._probe_loop())

    def _down(self) -> list[Member]:
        seen: dict[int, Member] = {}
        for pool in self.pools.values():
            for m in pool.members:
                if not m.up:
                    seen[id(m)] = m
        return list(seen.values())

    async def _probe_loop(self) -> None:
        """Probe each member that is out when its back-off ends; stop when none is out."""
        wake = self._wake
        assert wake is not None
        while True:
            down = self._down()
            if not down:
                return
            now = time.monotonic()
            due = [m for m in down if m.retry_at <= now]
            if due:
                await asyncio.gather(*(self._probe_one(m) for m in due))
                continue
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(m.retry_at for m in down) - now)

    async def _probe_one(self, member: Member) -> None:
        try:
            adapter = self._registry.adapter(member.engine_id)
            await asyncio.wait_for(adapter.list_models(), PROBE_TIMEOUT_S)
        except Exception as exc:  # (whatever the failure, the member stays out)
            member.failures += 1
            member.retry_at = time.monotonic() + self.backoff.after(member.failures)
            log.debug("pool member %s still out: %s", member.engine_id, exc)
            return
        member.up = True
        member.failures = 0
        log.warning("pool member %s back in rotation", member.engine_id)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    # --- requests -----------------------------------------------------------------------------

    def no_member(self, pool: Pool) -> EngineError:
        return EngineNetworkError(f"pool {pool.name} has no healthy member")

    async def call(self, pool: Pool, fn: Callable[[EngineAdapter], Awaitable[T]]) -> T:
        """``fn`` on the least-busy member; retried once on another member when the first one
        fails (nothing has reached the client yet: the caller sends the result)."""
        tried: Member | None = None
        failure: EngineError | None = None
        while True:
            member = pool.pick(tried)
            if member is None:
                raise failure or self.no_member(pool)  # (no other member: the first error)
            member.in_flight += 1
            try:
                return await fn(self._registry.adapter(member.engine_id))
            except EngineError as exc:
                if is_member_failure(exc):
                    self.mark_down(member, exc.message)
                if tried is not None or not _worth_retrying(exc):
                    raise
                tried, failure = member, exc
            finally:
                member.in_flight -= 1

    async def stream(
        self, pool: Pool, open_stream: Callable[[EngineAdapter], AsyncIterator[bytes]]
    ) -> AsyncIterator[bytes]:
        """The events of ``open_stream`` on the least-busy member. A member that fails before
        its first event is replaced once; after the first event, failures propagate."""
        tried: Member | None = None
        failure: EngineError | None = None
        while True:
            member = pool.pick(tried)
            if member is None:
                raise failure or self.no_member(pool)
            member.in_flight += 1
            events: AsyncIterator[bytes] | None = None
            try:
                events = open_stream(self._registry.adapter(member.engine_id))
                try:
                    first = await anext(events)
                except StopAsyncIteration:
                    return
                except EngineError as exc:
                    if is_member_failure(exc):
                        self.mark_down(member, exc.message)
                    if tried is not None or not _worth_retrying(exc):
                        raise
                    tried, failure = member, exc
                    continue
                yield first
                try:
                    async for event in events:
                        yield event
                except EngineError as exc:
                    if is_member_failure(exc):
                        self.mark_down(member, exc.message)
                    raise
                return
            finally:
                member.in_flight -= 1
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()


class PoolAdapter(EngineAdapter):
    """What the routes see for ``flm://pool:NAME/model``: each call goes to a member."""

    def __init__(self, pools: PoolSet, pool: Pool, caps: Capabilities) -> None:
        # (no client of its own: every request is a member's)
        self.endpoint = EngineEndpoint(pool.id, EngineKind("pool"), "", "pool")
        self._pools = pools
        self._pool = pool
        self._caps = caps

    def capabilities(self) -> Capabilities:
        return self._caps

    def serves(self, pool: Pool, caps: Capabilities) -> bool:
        """Whether this adapter is the one for ``pool`` with ``caps`` (reused while so)."""
        return self._pool is pool and self._caps is caps

    async def close(self) -> None:
        return None

    async def health_check(self, timeout_s: float) -> Health:
        raise EngineNetworkError("a pool has no health check of its own")

    async def list_models(self) -> list[ModelInfo]:
        raise EngineNetworkError("a pool has no model list of its own")

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._pools.call(self._pool, lambda a: a.chat(body))

    async def chat_bytes(
        self, body: dict[str, Any], public_model: str, raw_body: bytes | None = None
    ) -> bytes:
        return await self._pools.call(
            self._pool, lambda a: a.chat_bytes(body, public_model, raw_body)
        )

    def chat_stream(self, body: dict[str, Any], public_model: str) -> AsyncIterator[bytes]:
        return self._pools.stream(self._pool, lambda a: a.chat_stream(body, public_model))

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._pools.call(self._pool, lambda a: a.embeddings(body))
