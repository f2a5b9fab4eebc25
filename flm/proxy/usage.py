"""Per-key limits and usage accounting.

:class:`KeyLedger` holds, in memory, what the per-key checks need: a request bucket (rpm and
burst), a token bucket (tpm) and today's totals (daily budgets). Checking a request is a few
arithmetic operations on one object; nothing here touches SQLite on the request path.

:class:`UsageSink` keeps the usage rollups in ``security.db``: the request path appends one
tuple to a deque, and a background thread sums the queue by minute and by hour per key ×
model × engine and adds the sums to ``usage_minute`` and ``usage_hour`` in one transaction
(every ``interval`` seconds). The same thread deletes minute rows older than 48 hours and
hour rows older than 90 days, now and then, and adds each written batch's tokens to the
per-key token metrics (``flm_key_tokens_total``: up to date within ``interval``; counting
them per request on the event loop cost more than the rest of the accounting).

Budgets survive a restart: at start (and at each reload, after this process's own rollups
are written) the proxy loads today's totals per key from ``usage_minute``. Several proxies
share a budget the same way: each sees the others' use at its next reload.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from flm.core import threads
from flm.core.keyscope import KeyScope, filled
from flm.core.models import make_model_id
from flm.core.threads import background_thread
from flm.http.asgi import header_pairs
from flm.openai.errors import HttpError
from flm.storage.db import Database
from flm.storage.usage import DAY_S, add_rollups, prune_rollups

log = logging.getLogger("flm.usage")

PRUNE_INTERVAL_S = 600.0
#: The most requests queued for the rollups: what waits for the flusher, and what is kept for
#: a retry when the rollups cannot be written (a full disk, a locked or replaced file); past
#: this many, the oldest are dropped (counted in the log).
MAX_PENDING = 100_000
#: Requests summed between two pauses of the flusher thread (see :func:`_sums`).
SLICE = 128


def estimate_tokens(text: str) -> int:
    """A rough token count of ``text`` (about four characters a token), for engines that
    report no usage."""
    return (len(text) + 3) // 4


class _KeyState:
    __slots__ = ("at", "day_end", "day_requests", "day_tokens", "req_level", "tok_level")

    def __init__(self, now: float) -> None:
        self.day_end = 0.0
        self.new_day(now)
        # The buckets' levels as of ``at`` (both read together); infinite: full, whatever
        # the capacity (capped at the first reading).
        self.req_level = math.inf
        self.tok_level = math.inf
        self.at = now

    def new_day(self, now: float) -> None:
        """Today's totals start at zero (a new key, or the first request after 00:00 UTC)."""
        self.day_end = (now // DAY_S + 1) * DAY_S
        self.day_requests = 0
        self.day_tokens = 0


class KeyLedger:
    """The live counters behind each key's limits (one per proxy runtime)."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}
        #: Called at each 429 the ledger answers (the runtime counts them in
        #: ``flm_rate_limited_total{scope="key"}``).
        self.on_refusal: Callable[[], object] = _nothing

    def _state(self, key_id: str, now: float) -> _KeyState:
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState(now)
        elif now >= st.day_end:
            st.new_day(now)
        return st

    def admit(self, scope: KeyScope, path: str = "") -> bytes:
        """Let one request of ``scope``'s key (to ``path``) in, or raise the 401 or 429 to
        answer: the key's expiry, daily budgets and per-minute buckets. Returns the
        ``x-ratelimit-*`` header lines for the reply (``name: value\r\n`` each; empty for a
        key without per-minute limits).

        Runs for every request of a key with limits, so the usual case is written out
        inline, against limits the scope worked out when it was loaded: the day's end and
        the expiry in one comparison (:attr:`KeyScope.until`), then both buckets refilled to
        now at once (a bucket the key does not have stays infinite and full), and a request
        that finds them full takes the lines its scope rendered when it was loaded
        (:attr:`KeyScope.full_lines`; the same bytes the arithmetic would render). Anything
        else (a bucket not full, a refusal) takes :meth:`_admit_partial`.

        Every request is counted toward the daily request budget here, when it is let in
        (so that requests in flight count too); the few that do not count (listing models,
        reading metrics) are taken back by :meth:`uncount` when they end, and an exhausted
        budget does not refuse them."""
        now = self.clock()
        if now >= scope.until:
            self._renew(scope, now)
        st = scope.ledger
        if (
            st.day_requests >= scope.day_requests_cap or st.day_tokens >= scope.day_tokens_cap
        ) and counted(path):
            self.on_refusal()
            raise self._over_budget(scope, st, now)
        elapsed = now - st.at
        req = st.req_level + elapsed * scope.req_rate
        tok = st.tok_level + elapsed * scope.tok_rate
        st.at = now
        if req >= scope.req_full_from and tok >= scope.tok_full_from:
            st.req_level = scope.req_left_full
            st.tok_level = scope.tok_level_full
            st.day_requests += 1
            return scope.full_lines
        return self._admit_partial(scope, st, req, tok)

    def _renew(self, scope: KeyScope, now: float) -> None:
        """(:meth:`admit`) the scope's first request, a new UTC day, or an expired key:
        attach the key's counters to the scope (a new day starts them at zero) and work out
        when to look again; raise the 401 of an expired key."""
        if now >= scope.expires_cap:
            raise key_expired()
        st = scope.ledger = self._state(scope.key_id, now)
        scope.until = min(st.day_end, scope.expires_cap)

    def _admit_partial(self, scope: KeyScope, st: _KeyState, req: float, tok: float) -> bytes:
        """:meth:`admit` for a key with a bucket that is not full: ``req`` and ``tok`` are
        the buckets' levels refilled to now (``st.at``), not yet capped."""
        req_rate = scope.req_rate
        tok_rate = scope.tok_rate
        if req_rate and req > scope.req_capacity:
            req = scope.req_capacity
        if tok_rate and tok > scope.tok_capacity:
            tok = scope.tok_capacity
        if (req_rate and req < 1.0) or (tok_rate and tok <= 0.0):
            st.req_level = req
            st.tok_level = tok
            self.on_refusal()
            raise self._refuse(scope, req, tok)
        st.day_requests += 1
        # (``%d`` of a float truncates, as int() does.)
        lines = b""
        if req_rate:
            req -= 1.0
            lines = filled(
                scope.req_lines_ms, scope.req_lines, req, (scope.req_capacity - req) / req_rate
            )
        if tok_rate:
            lines += filled(
                scope.tok_lines_ms, scope.tok_lines, tok, (scope.tok_capacity - tok) / tok_rate
            )
        st.req_level = req
        st.tok_level = tok
        return lines

    @staticmethod
    def uncount(scope: KeyScope) -> None:
        """Take back a request :meth:`admit` counted that does not count toward the daily
        request budget (see there)."""
        st = scope.ledger
        if st is not None and st.day_requests > 0:
            st.day_requests -= 1

    def spend(self, scope: KeyScope, tokens: int) -> None:
        """Count a finished request's tokens for a key that :meth:`admit` let in: toward the
        daily tokens of the day it was let in, and off the token bucket as the bucket was
        last read (every :meth:`admit` reads it), without reading the clock again. The bucket
        refills linearly between two readings, so taking the tokens off at the last reading
        is exact unless the bucket filled up to its capacity since; then the request is
        charged as if it had been made when the bucket was read (at the latest, when it was
        let in), and the refill of the time it ran counts toward it. A key never let in
        (its counters not attached) is charged by :meth:`charge`."""
        st = scope.ledger
        if st is None:
            self.charge(scope.key_id, tokens, scope.tpm)
            return
        st.day_tokens += tokens
        if scope.tok_rate:
            st.tok_level -= tokens

    def _refuse(self, scope: KeyScope, req: float, tok: float) -> HttpError:
        """The 429 for a key whose request or token bucket has no room, with the
        ``x-ratelimit-*`` headers; ``req`` and ``tok`` are the levels now (capped), nothing
        is charged."""
        lines = b""
        wait = 0.0
        if scope.req_rate:
            rate, capacity = scope.req_rate, scope.req_capacity
            if req < 1.0:
                wait = (1.0 - req) / rate
            reset = max(wait, (capacity - req) / rate)
            lines += filled(scope.req_lines_ms, scope.req_lines, req, reset)
        if scope.tok_rate:
            rate, capacity = scope.tok_rate, scope.tok_capacity
            if tok <= 0:
                reset = (1.0 - tok) / rate
                wait = max(wait, reset)
            else:
                reset = (capacity - tok) / rate
            lines += filled(scope.tok_lines_ms, scope.tok_lines, max(tok, 0.0), reset)
        retry = max(1, math.ceil(wait))
        return HttpError(
            429,
            "rate_limited",
            f"the key's per-minute limit is reached; retry in {retry} s",
            [(b"retry-after", str(retry).encode()), *header_pairs(lines)],
        )

    @staticmethod
    def _over_budget(scope: KeyScope, st: _KeyState, now: float) -> HttpError:
        if st.day_requests >= scope.day_requests_cap:
            what = f"the key's daily request budget ({scope.daily_requests}) is used up"
        else:
            what = f"the key's daily token budget ({scope.daily_tokens}) is used up"
        return _budget(now, what)

    def charge(self, key_id: str, tokens: int, tpm: int | None) -> None:
        """Count a finished request's tokens toward the key's day and, with a ``tpm``, its
        token bucket, as :meth:`spend` does, by key id (a request that used more tokens than
        were left leaves a debt, below zero, that the next requests wait out)."""
        if not tokens:
            return
        st = self._state(key_id, self.clock())
        st.day_tokens += tokens
        if tpm is not None:
            if st.tok_level > tpm:  # (never read yet, or the limit was lowered)
                st.tok_level = float(tpm)
            st.tok_level -= tokens

    def today(self, key_id: str) -> tuple[int, int]:
        """(requests, tokens) counted today for the key (this process's view)."""
        st = self._keys.get(key_id)
        if st is None or self.clock() >= st.day_end:
            return 0, 0
        return st.day_requests, st.day_tokens

    def load_today(self, totals: dict[str, tuple[int, int]]) -> None:
        """Set today's (requests, tokens) per key from the stored rollups."""
        now = self.clock()
        for key_id, st in self._keys.items():
            if key_id not in totals and now < st.day_end:
                st.day_requests = st.day_tokens = 0
        for key_id, (requests, tokens) in totals.items():
            st = self._state(key_id, now)
            st.day_requests, st.day_tokens = requests, tokens

    def retain_only(self, key_ids: set[str]) -> None:
        for key_id in [k for k in self._keys if k not in key_ids]:
            del self._keys[key_id]


def _nothing() -> None:
    return None


#: Paths that do not count toward a key's daily request budget (with ``/v1/models/{id}``).
_UNCOUNTED_PATHS = frozenset({"/v1/models", "/metrics"})
#: The ``WWW-Authenticate`` header of every 401 about a key (RFC 6750).
BEARER_CHALLENGE = [(b"www-authenticate", b'Bearer realm="flm"')]


def counted(path: str) -> bool:
    """Whether a request to ``path`` counts toward the key's daily request budget."""
    return path not in _UNCOUNTED_PATHS and not path.startswith("/v1/models/")


def key_expired() -> HttpError:
    return HttpError(401, "key_expired", "this API key has expired", BEARER_CHALLENGE)


def _budget(now: float, message: str) -> HttpError:
    retry = max(1, math.ceil(DAY_S - now % DAY_S))
    return HttpError(
        429,
        "budget_exceeded",
        f"{message}; it renews at 00:00 UTC",
        [(b"retry-after", str(retry).encode())],
    )


#: (ts, key id, model, engine id, prompt tokens, completion tokens, estimated 0/1, key label)
_Item = tuple[float, str, str, str, int, int, int, str]


class UsageSink:
    """Usage rollups written by a background thread (see the module docstring)."""

    def __init__(
        self,
        db: Database | None,
        interval: float = 1.0,
        on_tokens: Callable[[str, str, int, int], None] | None = None,
    ) -> None:
        self._db = db
        self._interval = interval
        #: Called by the flusher with (key label, model, prompt, completion) sums once a
        #: batch is written (the per-key token metrics: kept off the request path).
        self.on_tokens = on_tokens
        # (bounded: a flusher starved of the CPU cannot let the queue grow without end)
        self._items: deque[_Item] = deque(maxlen=MAX_PENDING)
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()
        self._pruned_at = 0.0
        #: Requests whose usage could not be kept for a retry (see :meth:`_keep_for_retry`).
        self.dropped = 0
        #: :meth:`record` with its arguments as one tuple (``estimated`` as 0 or 1): the
        #: request path's form, the queue's own ``append`` (no Python frame).
        self.record_item: Callable[[_Item], None] = self._items.append
        self._thread = threading.Thread(target=self._run, name="flm-usage", daemon=True)
        self._thread.start()

    def record(
        self,
        ts: float,
        key_id: str,
        model: str,
        engine_id: str,
        prompt: int,
        completion: int,
        estimated: bool,
        label: str = "",
    ) -> None:
        """One finished request (request path: one append)."""
        self._items.append(
            (ts, key_id, model, engine_id, prompt, completion, int(estimated), label)
        )

    def _run(self) -> None:
        background_thread()
        while not self._stop:
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush(pause=True)
            except Exception:  # noqa: S112 - flush logged the cause and the count; retried next round
                continue
            try:
                if time.monotonic() - self._pruned_at >= PRUNE_INTERVAL_S:
                    self.prune()
            except Exception:  # pragma: no cover - logged, never fatal for the proxy
                log.exception("usage rollups not pruned")

    def flush(self, *, pause: bool = False) -> int:
        """Add everything queued so far to the rollups; the number of requests written.
        ``pause`` (the flusher thread): sum the queue in slices with a pause between them."""
        with self._lock:
            batch: list[_Item] = []
            while self._items:
                batch.append(self._items.popleft())
            if len(batch) >= MAX_PENDING:
                log.warning(
                    "usage queue reached its bound (%d requests): the oldest may be lost",
                    MAX_PENDING,
                )
            if not batch:
                return 0
            minutes, hours, last_used, tokens = _sums(batch, pause)
            if self._db is not None:
                try:
                    add_rollups(
                        self._db, minutes, hours, {k: _iso(t) for k, t in last_used.items()}
                    )
                except Exception as exc:
                    self._keep_for_retry(batch, exc)  # (summed again, and reported, once written)
                    raise
            on_tokens = self.on_tokens
            if on_tokens is not None:
                for (label, model), (prompt, completion) in tokens.items():
                    on_tokens(label, model, prompt, completion)
            if self.dropped:
                log.warning("usage rollups written again; %d requests were lost", self.dropped)
                self.dropped = 0
            return len(batch)

    def _keep_for_retry(self, batch: list[_Item], exc: Exception) -> None:
        """Put an unwritten batch back at the front of the queue (oldest first), keeping at
        most :data:`MAX_PENDING` requests; what does not fit is counted as lost."""
        room = MAX_PENDING - len(self._items)
        lost = max(0, len(batch) - max(room, 0))
        if lost:
            self.dropped += lost
            batch = batch[lost:]
        self._items.extendleft(reversed(batch))
        log.error(
            "usage rollups not written (%s: %s); %d requests kept for a retry, %d lost so far",
            type(exc).__name__,
            exc,
            len(self._items),
            self.dropped,
        )

    def prune(self, now: float | None = None) -> None:
        """Delete minute rows past 48 hours and hour rows past 90 days."""
        self._pruned_at = time.monotonic()
        if self._db is None:
            return
        prune_rollups(self._db, time.time() if now is None else now)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()


_Sums = dict[tuple[int, str, str, str], list[int]]


def _sums(
    batch: list[_Item], pause: bool
) -> tuple[_Sums, _Sums, dict[str, float], dict[tuple[str, str], list[int]]]:
    """The queue summed per minute and per hour × key × model × engine, each key's last
    use, and the (prompt, completion) tokens per key label × model.

    Summing a second of a busy gateway's requests is milliseconds of Python holding the GIL,
    which the loop would wait out (the p99 latency): with ``pause`` it is done in slices of
    :data:`SLICE` requests with a pause between them (until a pause finds the loop
    saturated). The hours and the tokens are summed from the minutes."""
    minutes: _Sums = {}
    last_used: dict[str, float] = {}
    labels: dict[str, str] = {}
    for start in range(0, len(batch), SLICE):
        if start and pause:
            pause = threads.pause()
        for ts, key_id, model, engine, prompt, completion, estimated, label in batch[
            start : start + SLICE
        ]:
            at = (int(ts // 60), key_id, model, engine)
            sums = minutes.get(at)
            if sums is None:
                minutes[at] = [1, prompt, completion, estimated]
            else:
                sums[0] += 1
                sums[1] += prompt
                sums[2] += completion
                sums[3] += estimated
            if ts > last_used.get(key_id, 0.0):
                last_used[key_id] = ts
                labels[key_id] = label
    hours: _Sums = {}
    tokens: dict[tuple[str, str], list[int]] = {}
    for (minute, key_id, model, engine), sums in minutes.items():
        at = (minute // 60, key_id, model, engine)
        total = hours.get(at)
        if total is None:
            hours[at] = sums.copy()
        else:
            for i, value in enumerate(sums):
                total[i] += value
        if sums[1] or sums[2]:
            pair = tokens.setdefault((labels[key_id], model), [0, 0])
            pair[0] += sums[1]
            pair[1] += sums[2]
    return minutes, hours, last_used, tokens


def _iso(ts: float) -> str:
    from flm.proxy.audit import iso_ts

    return iso_ts(ts)


#: Routes that are not counted as use of a key (listing models, reading metrics).
UNCOUNTED_ROUTES = frozenset({"/v1/models", "/v1/models/{id}", "/metrics"})


def account(rt: Any, state: Any, ts: float) -> None:
    """Charge a finished request to its key: the ledger (budgets, tpm), the rollups (queued
    for the flusher) and the per-key token metrics. Runs in the request's ``finally``."""
    key: KeyScope | None = state.key
    if key is None:
        return
    if state.route in UNCOUNTED_ROUTES:
        if key.limits:  # (admit counted it toward the daily requests)
            KeyLedger.uncount(key)
        return
    prompt = state.prompt_tokens or 0
    completion = state.completion_tokens or 0
    # (a refused request names no model: a client cannot fill the rollups with made-up ones)
    model = (state.model or "")[:200] if prompt or completion or state.status < 400 else ""
    # (the ledger counts tokens only where a limit needs them: a budget set later is loaded
    # with today's totals from the rollups at the reload that brings it)
    if key.limits and (prompt or completion):
        rt.ledger.spend(key, prompt + completion)
    usage = rt.usage
    if usage is not None:  # (its flusher adds the tokens to the per-key metrics)
        usage.record_item(
            (
                ts,
                key.key_id,
                model,
                state.engine_id or "",
                prompt,
                completion,
                1 if state.usage_estimated else 0,
                key.label,
            )
        )
    elif prompt or completion:
        rt.metrics.record_key_tokens(key.label, model, prompt, completion)


def model_not_allowed(engine_id: str, model: str) -> HttpError:
    """The 403 for a key whose scope leaves out ``flm://engine_id/model``."""
    model_id = make_model_id(engine_id, model)
    return HttpError(
        403, "model_not_allowed", f"this API key may not use the model {model_id[:200]!r}"
    )


def require_engine(state: Any, engine_id: str) -> None:
    """403 ``model_not_allowed`` unless the request's key may use all of the engine's models
    (the native API behind ``/engine/{id}/`` reaches any of them)."""
    key: KeyScope | None = state.key
    if key is not None and not key.allows_engine(engine_id):
        raise HttpError(
            403, "model_not_allowed", f"this API key may not use the engine {engine_id!r} directly"
        )
