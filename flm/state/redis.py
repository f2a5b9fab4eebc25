"""The Redis backend: shared buckets, failure counts, scores, blocks and revocations.

One :class:`RedisState` per gateway process. The request path makes at most one call
(:meth:`RedisState.admit`, one ``EVALSHA``); refusals (an auth failure, an intrusion score, a
block) make one more. A supervisor task keeps one pub/sub connection open and hands every
message from the other processes to :attr:`RedisState.on_message`; when Redis cannot be
reached it marks the backend down (the request path then answers without Redis: fail closed
or fail open, the caller's choice), retries with back-off and, once Redis answers again, runs
:attr:`RedisState.on_restore` (the caller re-publishes its keys, policy and blocks) before it
marks the backend up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from flm.state import BackendDown, scripts
from flm.state.config import StateBackendConfig

log = logging.getLogger("flm.state")

PREFIX = "flm:"
CHANNEL = PREFIX + "events"
BLOCKS = PREFIX + "blocks"
REVOKED = PREFIX + "revoked"
KEYS = PREFIX + "keys"
POLICY = PREFIX + "policy"
#: How long one call may take before Redis counts as unreachable (loopback or LAN).
CALL_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 1.0
#: Reconnect back-off: first wait, and the longest.
BACKOFF_S = (0.2, 5.0)
#: Errors that mean "Redis is not answering" (a script error is a bug and is raised).
UNREACHABLE = (RedisError, OSError, asyncio.TimeoutError)

Verdict = tuple[str, float, float, float, bool]


def bucket(name: str) -> str:
    return PREFIX + "b:" + name


def failures_key(ip: str) -> str:
    return PREFIX + "f:" + ip


def score_key(ip: str) -> str:
    return PREFIX + "s:" + ip


def parse_block(raw: str) -> tuple[str, float | None, float]:
    """(reason, until or None for permanent, since) from a ``flm:blocks`` value."""
    reason, until, since = raw.split("|", 2)
    return reason, (float(until) if until else None), float(since)


class RedisState:
    def __init__(self, config: StateBackendConfig, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        #: names this process in the messages it publishes (its own are ignored)
        self.origin = secrets.token_hex(8)
        self.available = False
        #: when the backend went down (None: up), and the last error said
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.on_message: Callable[[dict[str, Any]], None] = lambda message: None
        self.on_restore: Callable[[], Awaitable[None]] | None = None
        #: (kind, details) of backend events: ``state_backend_unavailable`` once per outage,
        #: ``state_backend_restored`` when it ends
        self.on_event: Callable[[str, dict[str, Any]], None] = lambda kind, details: None
        self._client = self._connect()
        self._admit = self._client.register_script(scripts.ADMIT)
        self._auth_failure = self._client.register_script(scripts.AUTH_FAILURE)
        self._score = self._client.register_script(scripts.SCORE)
        self._block = self._client.register_script(scripts.BLOCK)
        self._unblock = self._client.register_script(scripts.UNBLOCK)
        self._put_key = self._client.register_script(scripts.PUT_KEY)
        self._sync_client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    def _connect(self) -> aioredis.Redis:
        c = self.config
        return aioredis.Redis(
            host=_host(c.url),
            port=_port(c.url),
            db=c.db,
            username=_user(c.url),
            password=c.password(),
            ssl=c.tls,
            ssl_ca_certs=c.ca_file,
            socket_timeout=CALL_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            decode_responses=True,
            # (no retries: the request path must learn at once that Redis is gone)
            retry=Retry(NoBackoff(), 0),
            max_connections=64,
        )

    def record_sync(self, key_id: str) -> dict[str, Any] | None:
        """One key's shared record, from a worker thread (the Argon2 verify pool); None when
        there is none or Redis is down."""
        if not self.available:
            return None
        if self._sync_client is None:
            import redis as sync_redis
            from redis.backoff import NoBackoff as SyncNoBackoff
            from redis.retry import Retry as SyncRetry

            c = self.config
            self._sync_client = sync_redis.Redis(
                host=_host(c.url),
                port=_port(c.url),
                db=c.db,
                username=_user(c.url),
                password=c.password(),
                ssl=c.tls,
                ssl_ca_certs=c.ca_file,
                socket_timeout=CALL_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                decode_responses=True,
                retry=SyncRetry(SyncNoBackoff(), 0),
                max_connections=8,
            )
        try:
            text = self._sync_client.hget(KEYS, key_id)
        except UNREACHABLE:
            return None
        if not isinstance(text, str):
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    # --- life cycle ------------------------------------------------------------------------

    async def connect(self, tries: int = 3) -> bool:
        """Reach Redis at start (``tries`` pings); whether it answered."""
        for attempt in range(tries):
            try:
                await self._client.ping()
            except UNREACHABLE as exc:
                self.last_error = _describe(exc)
                if attempt + 1 < tries:
                    await asyncio.sleep(BACKOFF_S[0] * (attempt + 1))
                continue
            self.available = True
            self.down_since = None
            self.last_error = None
            return True
        self._went_down(self.last_error or "unreachable")
        return False

    def start(self) -> None:
        """Start the supervisor (pub/sub, reconnects) on the running loop."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._supervise())

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(*UNREACHABLE):
            await self._client.aclose()
        if self._sync_client is not None:
            with contextlib.suppress(*UNREACHABLE):
                self._sync_client.close()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "url": self.config.display,
            "reachable": self.available,
            "fail_open": self.config.fail_open,
            "down_since": self.down_since,
            "last_error": self.last_error,
        }

    def _went_down(self, error: str) -> None:
        """Mark the backend down (once per outage: one event) and wake the supervisor."""
        self.last_error = error
        if self.available or self.down_since is None:
            self.available = False
            self.down_since = self.clock()
            log.warning("state backend %s unreachable: %s", self.config.display, error)
            self.on_event(
                "state_backend_unavailable",
                {
                    "backend": self.config.display,
                    "error": error,
                    "mode": "fail_open" if self.config.fail_open else "fail_closed",
                },
            )
        self.available = False
        self._wake.set()

    def lost(self, exc: BaseException) -> BackendDown:
        self._went_down(_describe(exc))
        return BackendDown(str(exc))

    async def _supervise(self) -> None:
        backoff = BACKOFF_S[0]
        while not self._closed:
            pubsub = None
            try:
                await self._client.ping()
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(CHANNEL)
                if not self.available:
                    # (subscribed first: nothing published while the state is re-read is lost)
                    if self.on_restore is not None:
                        await self.on_restore()
                    was_down = self.down_since
                    self.available = True
                    self.down_since = None
                    self.last_error = None
                    if was_down is not None:
                        log.warning("state backend %s reachable again", self.config.display)
                        self.on_event(
                            "state_backend_restored",
                            {
                                "backend": self.config.display,
                                "down_s": round(self.clock() - was_down, 1),
                            },
                        )
                backoff = BACKOFF_S[0]
                self._wake.clear()
                while not self._wake.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message.get("data"))
                    elif message is None:
                        await self._client.ping()  # (a dead server is noticed within ~1 s)
                if not self.available:
                    raise ConnectionError(self.last_error or "unreachable")
            except asyncio.CancelledError:
                raise
            except UNREACHABLE as exc:
                self._went_down(_describe(exc))
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff)
                self._wake.clear()
                backoff = min(backoff * 2, BACKOFF_S[1])
            except Exception:  # pragma: no cover - a bug in a handler: logged, retried
                log.exception("state backend supervisor failed")
                await asyncio.sleep(backoff)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*UNREACHABLE):
                        await pubsub.aclose()

    def _deliver(self, data: Any) -> None:
        try:
            message = json.loads(data)
        except (TypeError, ValueError):
            return
        if not isinstance(message, dict) or message.get("o") == self.origin:
            return
        try:
            self.on_message(message)
        except Exception:  # pragma: no cover - a bug in a handler must not stop the listener
            log.exception("state backend message handler failed")

    # --- the request path ------------------------------------------------------------------

    async def admit(
        self,
        ip: str,
        key_id: str,
        ip_limit: tuple[int, int],
        key_limit: tuple[int, int],
        own_limit: tuple[int, int],
        check_block: bool = True,
    ) -> list[str]:
        """One request's shared checks (see :data:`flm.state.scripts.ADMIT`);
        :class:`BackendDown` when Redis does not answer."""
        try:
            result: list[str] = await self._admit(
                keys=(
                    BLOCKS,
                    REVOKED,
                    bucket("ip:" + ip),
                    bucket("key:" + key_id),
                    bucket("own:" + key_id),
                ),
                args=(
                    self.clock(),
                    ip,
                    key_id,
                    *ip_limit,
                    *key_limit,
                    *own_limit,
                    int(check_block),
                ),
            )
        except UNREACHABLE as exc:
            raise self.lost(exc) from None
        return result

    async def auth_failure(
        self,
        ip: str,
        *,
        window_s: float,
        enabled: bool,
        max_failures: int,
        first_s: float,
        second_s: float,
        permanent: int,
        exempt: bool,
    ) -> tuple[int, tuple[str, float | None, float] | None]:
        try:
            count, reason, until, since = await self._auth_failure(
                keys=(failures_key(ip), BLOCKS),
                args=(
                    self.clock(),
                    ip,
                    window_s,
                    int(enabled),
                    max_failures,
                    first_s,
                    second_s,
                    permanent,
                    int(exempt),
                    CHANNEL,
                    self.origin,
                ),
            )
        except UNREACHABLE as exc:
            raise self.lost(exc) from None
        return int(count), _block(reason, until, since)

    async def add_score(
        self,
        ip: str,
        points: int,
        *,
        window_s: float,
        threshold: int,
        short_s: float,
        long_s: float,
        exempt: bool,
    ) -> tuple[int, tuple[str, float | None, float] | None]:
        try:
            total, reason, until, since = await self._score(
                keys=(score_key(ip), BLOCKS),
                args=(
                    self.clock(),
                    ip,
                    points,
                    window_s,
                    threshold,
                    short_s,
                    long_s,
                    int(exempt),
                    CHANNEL,
                    self.origin,
                ),
            )
        except UNREACHABLE as exc:
            raise self.lost(exc) from None
        return int(total), _block(reason, until, since)

    # --- what the sync and the owner's commands change -------------------------------------

    async def block(
        self, ip: str, reason: str, until: float | None
    ) -> tuple[tuple[str, float | None, float], bool]:
        """Block ``ip`` everywhere (never shortening a longer block): (the block in force,
        whether it changed)."""
        try:
            reason_, until_, since, changed = await self._block(
                keys=(BLOCKS,),
                args=(
                    self.clock(),
                    ip,
                    reason,
                    "" if until is None else repr(until),
                    CHANNEL,
                    self.origin,
                ),
            )
        except UNREACHABLE as exc:
            raise self.lost(exc) from None
        block = _block(reason_, until_, since)
        assert block is not None
        return block, changed == "1"

    async def unblock(self, ip: str) -> bool:
        try:
            had = await self._unblock(
                keys=(BLOCKS, failures_key(ip), score_key(ip)), args=(ip, CHANNEL, self.origin)
            )
        except UNREACHABLE as exc:
            raise self.lost(exc) from None
        return bool(had)

    async def blocks(self) -> dict[str, tuple[str, float | None, float]]:
        """Every block in force (expired entries are left to the scripts)."""
        try:
            raw: dict[str, str] = await self._client.hgetall(BLOCKS)  # type: ignore[assignment]
        except UNREACHABLE as exc:
            raise self.lost(exc) from None
        now = self.clock()
        out = {}
        for ip, value in raw.items():
            try:
                block = parse_block(value)
            except ValueError:
                continue
            if block[1] is None or block[1] > now:
                out[ip] = block
        return out

    async def put_key(self, key_id: str, record: dict[str, Any]) -> dict[str, Any]:
        """Store a key's record (a revoked key stays revoked); the record in force."""
        text = json.dumps(record, sort_keys=True, separators=(",", ":"))
        revoked = record.get("revoked_at") is not None
        try:
            stored = await self._put_key(
                keys=(KEYS, REVOKED), args=(key_id, text, int(revoked), CHANNEL, self.origin)
            )
        except UNREACHABLE as exc:
            raise self.lost(exc) from None
        result: dict[str, Any] = json.loads(stored) if stored else record
        return result

    async def keys(self) -> dict[str, dict[str, Any]]:
        try:
            raw: dict[str, str] = await self._client.hgetall(KEYS)  # type: ignore[assignment]
        except UNREACHABLE as exc:
            raise self.lost(exc) from None
        out = {}
        for key_id, text in raw.items():
            with contextlib.suppress(ValueError):
                record = json.loads(text)
                if isinstance(record, dict):
                    out[key_id] = record
        return out

    async def policy(self) -> dict[str, Any] | None:
        try:
            text = await self._client.get(POLICY)
        except UNREACHABLE as exc:
            raise self.lost(exc) from None
        if not text:
            return None
        with contextlib.suppress(ValueError):
            document = json.loads(text)
            if isinstance(document, dict):
                return document
        return None

    async def put_policy(self, document: dict[str, Any]) -> None:
        """Store the shared policy (the caller announces it)."""
        text = json.dumps(document, sort_keys=True, separators=(",", ":"))
        try:
            await self._client.set(POLICY, text)
        except UNREACHABLE as exc:
            raise self.lost(exc) from None

    async def announce(self, kind: str) -> None:
        """Tell the other processes that ``kind`` (``keys``) changed."""
        try:
            await self._client.publish(CHANNEL, json.dumps({"o": self.origin, "t": kind}))
        except UNREACHABLE as exc:
            raise self.lost(exc) from None


def _block(reason: str, until: str, since: str) -> tuple[str, float | None, float] | None:
    if not reason:
        return None
    return reason, (float(until) if until else None), float(since)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:300]


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or "localhost"


def _port(url: str) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port or 6379


def _user(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    user = urlsplit(url).username
    return unquote(user) if user else None
