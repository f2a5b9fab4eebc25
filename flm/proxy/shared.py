"""A gateway on a shared state backend (``flm proxy start --state-backend redis://…``).

:class:`SharedGuard` ties one :class:`~flm.state.redis.RedisState` to a running proxy:

- **the request path**: :mod:`flm.proxy.middleware.security` calls :meth:`SharedGuard.admit`
  once per request that needs a key (blocks, revocation, per-address, per-key and the key's
  own request buckets in one script), and the failure and score scripts on refusals;
- **keys and policy**: every process mirrors its ``api_keys`` rows (the Argon2id hash, label,
  limits, times; never a plaintext) and its policy into Redis, and imports into its own
  ``security.db`` what the others put there. :meth:`SharedGuard.sync` runs at start, on every
  reload (``flm api-keys …`` and ``flm policy …`` notify the local proxies, which sync and
  then publish ``keys``/``policy``), on those messages from the other processes, and when
  Redis comes back. A change made here since the last sync wins over Redis; otherwise Redis
  wins; a revocation always wins;
- **blocks**: Redis holds the blocks in force; each process keeps a copy in its guard state
  (the block check costs no round trip), updated by ``block``/``unblock`` messages; blocks
  the owner makes or lifts with ``flm security`` in one process's database reach Redis at its
  next sync;
- **outages**: while Redis is unreachable, requests that need a key are refused with 503
  ``state_backend_unavailable`` (fail closed, the default) or served on this process's local
  state (``--state-fail-open``); one ``state_backend_unavailable`` event per outage and one
  ``state_backend_restored`` when it ends. The supervisor reconnects with back-off, re-syncs,
  and shared state resumes without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from flm.core.clients import subject
from flm.state import BackendDown
from flm.state.config import StateBackendConfig
from flm.state.redis import RedisState

log = logging.getLogger("flm.state")
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: Shared blocks are taken as they are; a block row in this process's database older than
#: the outage is re-published at the next sync.
Rows = list[tuple[str, str, float | None, float, int]]


def key_record(row: Any, key_hash: str) -> dict[str, Any]:
    """A key (``flm.storage.security.ApiKeyRow``) as it is shared: never a plaintext."""
    return {
        "label": row.label,
        "hash": key_hash,
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
        "limits": asdict(row.limits),
    }


def _text(record: Any) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _agree(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Two records of one key alike: the same, or both revoked (whenever: revoked is final)."""
    if mine.get("revoked_at") is not None and theirs.get("revoked_at") is not None:
        return True
    return _text(mine) == _text(theirs)


def _row_from_record(key_id: str, record: dict[str, Any]) -> tuple[Any, str] | None:
    from flm.storage.security import ApiKeyRow, KeyLimits

    try:
        limits = KeyLimits(**record["limits"])
        row = ApiKeyRow(
            key_id,
            str(record["label"]),
            str(record["created_at"]),
            None if record.get("revoked_at") is None else str(record["revoked_at"]),
            limits,
        )
        key_hash = str(record["hash"])
    except (KeyError, TypeError, ValueError):
        return None
    if not key_hash.startswith("$argon2id$") or _KEY_ID.fullmatch(key_id) is None:
        return None
    return row, key_hash


def _same(a: tuple[str, float | None] | None, b: tuple[str, float | None]) -> bool:
    """Two blocks (reason, until) alike: the table keeps times to the millisecond."""
    if a is None or a[0] != b[0] or (a[1] is None) != (b[1] is None):
        return False
    return a[1] is None or b[1] is None or abs(a[1] - b[1]) < 1.0


class SharedGuard:
    def __init__(self, backend: RedisState, ctx: Any, handle_id: str) -> None:
        self.backend = backend
        self.ctx = ctx
        self.handle_id = handle_id
        self.runtime: Any = None
        #: re-applies the stored keys, policy and blocks to the running proxy (set by the
        #: instance: ``reload_proxies`` for it)
        self.reload: Callable[[], Awaitable[Any]] | None = None
        #: key id → its record as this process and Redis last agreed on it
        self._keys: dict[str, str] = {}
        #: the policy as last agreed (None: not synced yet)
        self._policy: str | None = None
        #: this process's stored blocks at the last sync (None: not synced yet)
        self._listed: dict[str, tuple[str, float | None]] | None = None
        self._lock = asyncio.Lock()
        self._reloading: asyncio.Task[None] | None = None
        self._again = False
        #: an outage was noticed while serving fail-open (one event per outage)
        self._fail_open_said = False
        #: events from before a runtime (and its audit sink) was attached
        self._pending: list[tuple[str, dict[str, Any]]] = []
        backend.on_message = self._on_message
        backend.on_restore = self._restored
        backend.on_event = self._event

    @property
    def config(self) -> StateBackendConfig:
        return self.backend.config

    @property
    def available(self) -> bool:
        return self.backend.available

    def attach(self, runtime: Any) -> None:
        self.runtime = runtime
        runtime.shared = self
        pending, self._pending = self._pending, []
        for kind, details in pending:
            self._event(kind, details)

    def describe(self) -> dict[str, Any]:
        return self.backend.describe()

    async def close(self) -> None:
        if self._reloading is not None:
            self._reloading.cancel()
            await asyncio.gather(self._reloading, return_exceptions=True)
        await self.backend.close()

    # --- events ----------------------------------------------------------------------------

    def _event(self, kind: str, details: dict[str, Any]) -> None:
        rt = self.runtime
        if kind == "state_backend_restored":
            self._fail_open_said = False
        if rt is None:
            self._pending = [*self._pending[-7:], (kind, details)]
        elif rt.audit is not None:
            severity = "high" if kind == "state_backend_unavailable" else "medium"
            rt.audit.event(kind, severity, "", {**details, "listener": self.handle_id})

    def serving_open(self) -> None:
        """Record once per outage that requests are served on local state (fail open)."""
        if self._fail_open_said:
            return
        self._fail_open_said = True
        rt = self.runtime
        if rt is not None and rt.audit is not None:
            rt.audit.event(
                "state_backend_fail_open",
                "high",
                "",
                {
                    "backend": self.config.display,
                    "listener": self.handle_id,
                    "message": "serving on this process's local state until Redis returns",
                },
            )

    def _on_message(self, message: dict[str, Any]) -> None:
        rt = self.runtime
        if rt is None:
            return
        kind = message.get("t")
        if kind == "block":
            try:
                until = float(message["until"]) if message.get("until") else None
                block = (str(message["reason"]), until, float(message["since"]))
                ip = str(message["ip"])
            except (KeyError, TypeError, ValueError):
                return
            self._adopt(ip, block, persist=True)
        elif kind == "unblock":
            ip = str(message.get("ip") or "")
            if ip:
                rt.guard.unblock(ip)
                self._spawn(self._forget_block(ip))
        elif kind == "revoke":
            key_id = str(message.get("id") or "")
            if key_id:
                rt.keys.invalidate(key_id)
                rt.scopes.pop(key_id, None)
                self.schedule_reload()
        elif kind in ("keys", "policy"):
            self.schedule_reload()

    def _adopt(
        self, ip: str, block: tuple[str, float | None, float], *, persist: bool = False
    ) -> None:
        """Take a shared block into this process's guard; ``persist``: a block made by
        another process, also written to this process's blocklist table (so ``flm security
        blocklist`` lists it here and ``flm security unblock`` here lifts it everywhere)."""
        from flm.proxy.guard import MAX_TRACKED, Block, exempt_from_automatic_blocks

        rt = self.runtime
        if exempt_from_automatic_blocks(ip, rt.effective):
            return
        reason, until, since = block
        current = rt.guard.blocks.get(ip)
        if current is None and len(rt.guard.blocks) >= MAX_TRACKED:
            return  # (bounded: Redis still refuses it on every request with a key)
        if current is None or not current.outlasts(until):
            rt.guard.blocks[ip] = Block(reason, until, since)
            if persist and rt.audit is not None:
                rt.audit.block(ip, reason, since, until, 0, self.handle_id)
                if self._listed is not None:  # (in the table from now on, as if synced)
                    self._listed[ip] = (reason, until)

    async def _forget_block(self, ip: str) -> None:
        from flm.storage.records import BlocklistRepo

        repo = BlocklistRepo(self.ctx.storage.security)
        await asyncio.to_thread(repo.remove_matching, ip, subject)
        if self._listed is not None:  # (after the row is gone: a sync never sees it as new)
            self._listed.pop(ip, None)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        rt = self.runtime
        if rt is not None:
            rt.tasks.append(task)
            task.add_done_callback(lambda t: rt.tasks.remove(t) if t in rt.tasks else None)

    def schedule_reload(self) -> None:
        """Run the instance's reload soon (one at a time; one more if asked meanwhile)."""
        if self.reload is None:
            return
        if self._reloading is not None and not self._reloading.done():
            self._again = True
            return
        self._reloading = asyncio.ensure_future(self._reload_loop())

    async def _reload_loop(self) -> None:
        while True:
            self._again = False
            assert self.reload is not None
            try:
                await self.reload()
            except Exception:  # pragma: no cover - logged; the periodic reload retries
                log.exception("reload after a shared state change failed")
            if not self._again:
                return

    async def _restored(self) -> None:
        """Redis answers again: push what changed here meanwhile, pull the rest. This
        process's stored blocks are all offered again (a Redis without persistence comes
        back empty; a longer block there is never shortened)."""
        self._listed = None
        await self.sync()
        self.schedule_reload()

    # --- the request path ------------------------------------------------------------------

    async def admit(
        self,
        ip: str,
        key_id: str,
        ip_limit: tuple[int, int],
        key_limit: tuple[int, int],
        own_limit: tuple[int, int],
        check_block: bool,
    ) -> list[str]:
        return await self.backend.admit(ip, key_id, ip_limit, key_limit, own_limit, check_block)

    def row_of(self, key_id: str) -> Any:
        """A key only Redis knows yet (created through another process since the last
        sync), from a worker thread: its row, or None."""
        record = self.backend.record_sync(key_id)
        parsed = None if record is None else _row_from_record(key_id, record)
        return None if parsed is None else parsed[0]

    def hash_of(self, key_id: str) -> str | None:
        """The Argon2id hash of an active key only Redis knows yet (see :meth:`row_of`)."""
        record = self.backend.record_sync(key_id)
        parsed = None if record is None else _row_from_record(key_id, record)
        if parsed is None or parsed[0].revoked_at is not None:
            return None
        return parsed[1]

    def push_block(self, ip: str, reason: str, until: float | None) -> None:
        """Publish a block made on local state (an anomaly), off the request path."""

        async def push() -> None:
            with contextlib.suppress(BackendDown):
                await self.backend.block(ip, reason, until)

        self._spawn(push())

    def apply_block(self, ip: str, block: tuple[str, float | None, float]) -> Any:
        """A block a script made or found: into this process's guard; the guard's Block."""
        self._adopt(ip, block)
        from flm.proxy.guard import Block

        return self.runtime.guard.blocks.get(ip) or Block(*block)

    # --- sync ------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Keys, policy and blocks between this process's database and Redis (see the module
        docstring); :class:`BackendDown` when Redis does not answer."""
        async with self._lock:
            changed = await self._sync_keys()
            policy_changed = await self._sync_policy()
            if self.runtime is not None:
                await self._sync_blocks()
        if changed:
            await self.backend.announce("keys")
        if policy_changed:
            await self.backend.announce("policy")

    async def _sync_keys(self) -> bool:
        """Whether Redis's key records changed (the others are told then)."""
        from flm.core.errors import FlmError
        from flm.storage.security import ApiKeysRepo

        repo = ApiKeysRepo(self.ctx.storage.security)
        local = await asyncio.to_thread(repo.all_with_hashes)
        remote = await self.backend.keys()
        first = not self._keys and self._policy is None
        pushed = False
        for row, key_hash in local:
            record = key_record(row, key_hash)
            text = _text(record)
            theirs = remote.get(row.id)
            if theirs is not None:
                if _agree(record, theirs):
                    continue
                if first and not (record["revoked_at"] and not theirs.get("revoked_at")):
                    continue  # at start the shared copy wins (but for a revocation made here)
                if not first and self._keys.get(row.id) == text:
                    continue  # unchanged here since the last sync: the shared copy is newer
            stored = await self.backend.put_key(row.id, record)
            if theirs is None or _text(stored) != _text(theirs):
                pushed = True
            remote[row.id] = stored
        mine = {row.id: key_record(row, h) for row, h in local}
        imports = []
        for key_id, record in remote.items():
            held = mine.get(key_id)
            if held is not None and _agree(held, record):
                continue
            parsed = _row_from_record(key_id, record)
            if parsed is None:
                log.warning("ignoring a malformed shared key record %s", key_id[:32])
                continue
            imports.append(parsed)
        if imports:

            def store() -> list[tuple[Any, str]]:
                for row, key_hash in imports:
                    repo.import_key(row, key_hash)
                return repo.all_with_hashes()

            try:
                local = await asyncio.to_thread(store)
            except FlmError as exc:  # (a read-only database: the next sync tries again)
                log.warning("shared keys not stored here: %s", exc)
        # (what this process holds now, as agreed: a later difference is a change made here)
        self._keys = {row.id: _text(key_record(row, h)) for row, h in local}
        return pushed

    async def _sync_policy(self) -> bool:
        from flm.core.errors import FlmError
        from flm.services.policy import PolicyService

        service = PolicyService(self.ctx.storage)
        shown = await asyncio.to_thread(service.show)
        local = shown["policy"] if shown["source"] == "stored" else None
        remote = await self.backend.policy()
        local_text = None if local is None else _text(local)
        remote_text = None if remote is None else _text(remote)
        pushed = False
        if (
            local_text is not None
            and local_text != remote_text
            and (remote_text is None or (self._policy is not None and local_text != self._policy))
        ):
            assert local is not None
            await self.backend.put_policy(local)
            self._policy = local_text
            pushed = True
        elif remote is not None and remote_text != local_text:
            try:
                stored = await asyncio.to_thread(service.set, remote)
            except FlmError as exc:
                log.warning("ignoring the shared policy: %s", exc)
                self._policy = remote_text
            else:
                self._policy = _text(stored["policy"])
        else:
            self._policy = local_text or remote_text or ""
        return pushed

    async def _sync_blocks(self) -> None:
        from flm.proxy.runtime import load_block_rows

        rt = self.runtime
        if rt.audit is not None:
            await asyncio.to_thread(rt.audit.flush)  # blocks made here reach the table
        rows = await asyncio.to_thread(load_block_rows, self.ctx, self.handle_id)
        await self.apply_rows(rows)

    async def apply_rows(self, rows: Rows) -> None:
        """This process's stored blocks against the last sync: the owner's new blocks go to
        Redis, the ones they lifted are lifted there; then Redis's blocks become this
        process's."""
        from flm.proxy.guard import MAX_TRACKED, Block, exempt_from_automatic_blocks

        rt = self.runtime
        now = self.backend.clock()
        local: dict[str, tuple[str, float | None]] = {}
        for ip, reason, until, _since, _count in rows:
            local[subject(ip)] = (reason, until)
        before = self._listed
        for ip, (reason, until) in local.items():
            if until is not None and until <= now:
                continue
            if before is None or not _same(before.get(ip), (reason, until)):
                await self.backend.block(ip, reason, until)
        if before is not None:
            for ip in before.keys() - local.keys():
                await self.backend.unblock(ip)
                rt.guard.unblock(ip)
        shared = await self.backend.blocks()
        effective = rt.effective
        rt.guard.listed = set(local)
        held = (
            (ip, Block(*block))
            for ip, block in shared.items()
            if not exempt_from_automatic_blocks(ip, effective)
        )
        # (bounded like every table of the guard; Redis refuses the rest on each keyed request)
        rt.guard.blocks = dict(itertools.islice(held, MAX_TRACKED))
        if rt.audit is not None:  # (made elsewhere: listed here too, see _adopt)
            for ip, (reason, until, since) in shared.items():
                if ip in rt.guard.blocks and not _same(local.get(ip), (reason, until)):
                    rt.audit.block(ip, reason, since, until, 0, self.handle_id)
                    local[ip] = (reason, until)
        self._listed = local


async def start_shared(ctx: Any, config: StateBackendConfig, handle_id: str) -> SharedGuard:
    """Connect to the backend and bring this process's keys and policy in line with it
    (before the runtime reads them). Fail closed: ``ProxyError`` when Redis cannot be
    reached; fail open: start on local state (the supervisor keeps trying)."""
    from flm.core.errors import ProxyError

    backend = RedisState(config)
    guard = SharedGuard(backend, ctx, handle_id)
    if await backend.connect():
        with contextlib.suppress(BackendDown):
            await guard.sync()
    elif not config.fail_open:
        await backend.close()
        from flm.services.audit_events import record_security_event

        await asyncio.to_thread(
            record_security_event,
            ctx.storage,
            "state_backend_unavailable",
            "high",
            {
                "backend": config.display,
                "error": backend.last_error,
                "listener": handle_id,
                "action": "start_refused",
            },
        )
        raise ProxyError(
            f"the state backend {config.display} cannot be reached ({backend.last_error}); "
            "start Redis, or pass --state-fail-open to serve on local state meanwhile",
            code="PROXY_INVALID_CONFIG",
        )
    return guard


async def attach_shared(guard: SharedGuard, runtime: Any) -> None:
    """Put a runtime on the shared state backend: keys this process does not know yet are
    looked up in Redis; Redis's blocks are taken; the supervisor starts."""
    from flm.proxy.runtime import scope_from_row

    guard.attach(runtime)
    runtime.keys.fallback = guard.hash_of
    local = runtime.scope_loader

    def scope(key_id: str) -> Any:
        found = local(key_id) if local is not None else None
        if found is None:
            row = guard.row_of(key_id)
            found = None if row is None or row.revoked_at else scope_from_row(row)
        return found

    runtime.scope_loader = scope
    if guard.available:
        with contextlib.suppress(BackendDown):
            async with guard._lock:
                await guard._sync_blocks()
    guard.backend.start()
