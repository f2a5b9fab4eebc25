"""What one API key may do, in the form the hot path checks.

A key's models are ``flm://engine/model`` ids and simple globs (``*``, ``?``, ``[...]``, as
:mod:`fnmatch` reads them, case-sensitive). :class:`KeyScope` compiles them once, when the
proxy loads the key: exact ids go into a set, globs into one compiled regular expression, and
each answer is remembered in a bounded table, so a request costs a dictionary lookup.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import translate
from typing import Any

from flm.core.errors import UsageError
from flm.core.memo import remember
from flm.core.models import make_model_id
from flm.core.timeutil import iso, parse_iso

MAX_PATTERNS = 64
MAX_PATTERN_LENGTH = 300
#: ``flm://engine/model`` with globs allowed in both parts (the engine id's own characters).
_PATTERN = re.compile(r"^flm://[a-z0-9_\-*?\[\]!]{1,64}/[^\s]{1,255}$")
_GLOB = re.compile(r"[*?\[]")
_DURATION = re.compile(r"^(\d{1,6})([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def check_patterns(patterns: list[str]) -> list[str]:
    """The patterns, stripped and without repeats; a ``UsageError`` naming a bad one."""
    out: list[str] = []
    for raw in patterns:
        pattern = raw.strip()
        if len(pattern) > MAX_PATTERN_LENGTH or not _PATTERN.match(pattern):
            raise UsageError(
                f"--models takes flm://engine/model ids or globs such as "
                f"flm://ollama/*; not {raw[:80]!r}"
            )
        if pattern not in out:
            out.append(pattern)
    if len(out) > MAX_PATTERNS:
        raise UsageError(f"a key takes at most {MAX_PATTERNS} model patterns")
    return out


def parse_expiry(text: str, now: datetime | None = None) -> str:
    """``30d``, ``12h``, ``90m``, ``2w`` from now, or a date / ISO datetime (UTC unless it
    says otherwise), as FLM stores timestamps. A time in the past is allowed (an already
    expired key)."""
    text = text.strip()
    now = now or datetime.now(UTC)
    match = _DURATION.match(text)
    if match:
        return iso(now + timedelta(**{_UNITS[match[2]]: int(match[1])}))
    try:
        return iso(parse_iso(text))
    except ValueError:
        raise UsageError(
            f"--expires takes a duration (30d, 12h, 90m, 2w) or a date "
            f"(2026-12-31 or an ISO datetime); not {text[:60]!r}"
        ) from None


def _engine_of(pattern: str) -> str:
    return pattern[len("flm://") :].split("/", 1)[0]


def _limit_lines(what: bytes, limit: int) -> tuple[bytes, bytes]:
    """The templates of one bucket's ``x-ratelimit-*`` header lines (OpenAI's names), for
    ``template % (left, reset)``: the reset in milliseconds, and the reset as text."""
    head = b"x-ratelimit-limit-%b: %d\r\nx-ratelimit-remaining-%b: %%d\r\n" % (what, limit, what)
    reset = b"x-ratelimit-reset-%b: " % what
    return head + reset + b"%dms\r\n", head + reset + b"%b\r\n"


def reset_text(seconds: float) -> bytes:
    """A reset time as OpenAI writes it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return b"%dms" % (seconds * 1000 if seconds > 0 else 0)
    if seconds < 60:
        return b"%.3gs" % seconds
    minutes, rest = divmod(math.ceil(seconds), 60)
    return b"%dm%ds" % (minutes, rest)


def filled(ms: bytes, text: bytes, left: float, reset: float) -> bytes:
    """One bucket's ``x-ratelimit-*`` lines from its templates (:class:`KeyScope`'s
    ``req_lines_ms``/``req_lines`` or the token ones): ``left`` truncated, ``reset`` in
    seconds."""
    return ms % (left, reset * 1000) if reset < 1 else text % (left, reset_text(reset))


@dataclass(eq=False)
class KeyScope:
    """One key's settings, compiled for the request path."""

    key_id: str
    label: str
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    burst: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    daily_requests: int | None = None
    #: Unix time after which the key is refused, or None.
    expires_at: float | None = None
    read_only: bool = False
    _exact: frozenset[str] = field(default=frozenset(), repr=False)
    _glob: re.Pattern[str] | None = field(default=None, repr=False)
    _whole_engines: re.Pattern[str] | None = field(default=None, repr=False)
    _answers: dict[str, bool] = field(default_factory=dict, repr=False)
    _pairs: dict[tuple[str, str], bool] = field(default_factory=dict, repr=False)
    _engines: dict[str, bool] = field(default_factory=dict, repr=False)
    #: Whether the key has per-minute limits or daily budgets (the ledger admits it).
    limits: bool = field(default=False, init=False)
    #: Whether the key has anything to check after authentication (expiry, read-only,
    #: limits); the model scope is checked where the model is known.
    checked: bool = field(default=False, init=False)
    # What the ledger reads on every request, worked out once (the request path then does no
    # None checks and builds no constant header):
    #: The daily budgets, infinite when not set.
    day_requests_cap: float = field(default=math.inf, init=False, repr=False)
    day_tokens_cap: float = field(default=math.inf, init=False, repr=False)
    #: The request bucket: refill per second (0: no rpm), capacity.
    req_rate: float = field(default=0.0, init=False, repr=False)
    req_capacity: float = field(default=0.0, init=False, repr=False)
    #: The request bucket's three ``x-ratelimit-*`` header lines, to be filled in with the
    #: requests left and the time to a full bucket (in ms; or as text, ``%b``).
    req_lines_ms: bytes = field(default=b"", init=False, repr=False)
    req_lines: bytes = field(default=b"", init=False, repr=False)
    #: The token bucket: refill per second (0: no tpm), capacity, header-line templates.
    tok_rate: float = field(default=0.0, init=False, repr=False)
    tok_capacity: float = field(default=0.0, init=False, repr=False)
    tok_lines_ms: bytes = field(default=b"", init=False, repr=False)
    tok_lines: bytes = field(default=b"", init=False, repr=False)
    #: The lines of a request let in while every bucket the key has was full (a key used
    #: below its limits: the usual case), rendered once: the same bytes the ledger would
    #: render for that request, without the arithmetic and the formatting.
    full_lines: bytes = field(default=b"", init=False, repr=False)
    #: The level from which the ledger takes a bucket for full: its capacity, or for a
    #: bucket the key does not have, any level (its counters may keep a level from before
    #: the limit was taken away).
    req_full_from: float = field(default=-math.inf, init=False, repr=False)
    tok_full_from: float = field(default=-math.inf, init=False, repr=False)
    #: What the ledger sets a full bucket to when it lets a request in: all but one
    #: request (infinite: no rpm), every token (infinite: no tpm).
    req_left_full: float = field(default=math.inf, init=False, repr=False)
    tok_level_full: float = field(default=math.inf, init=False, repr=False)
    #: :attr:`expires_at`, infinite when not set.
    expires_cap: float = field(default=math.inf, init=False, repr=False)
    #: When the ledger must look at the key again before it lets a request in: the end of
    #: its counters' UTC day, or the expiry if sooner (one comparison on the request path;
    #: before the key's first request, at once).
    until: float = field(default=-math.inf, init=False, repr=False)
    #: The ledger's live counters of this key (:class:`flm.proxy.usage.KeyLedger` attaches
    #: them at the key's first request, so that the request path needs no lookup by id).
    ledger: Any = field(default=None, init=False, repr=False)
    #: Whether the ledger's :meth:`~flm.proxy.usage.KeyLedger.admit` is all there is to
    #: check (limits, and no read-only flag): its expiry is checked there too.
    admit_only: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.limits = any(
            v is not None for v in (self.rpm, self.tpm, self.daily_tokens, self.daily_requests)
        )
        self.checked = self.limits or self.read_only or self.expires_at is not None
        self.admit_only = self.limits and not self.read_only
        if self.expires_at is not None:
            self.expires_cap = self.expires_at
        if self.daily_requests is not None:
            self.day_requests_cap = self.daily_requests
        if self.daily_tokens is not None:
            self.day_tokens_cap = self.daily_tokens
        if self.rpm:
            self.req_rate = self.rpm / 60.0
            self.req_capacity = float(self.burst or self.rpm)
            self.req_lines_ms, self.req_lines = _limit_lines(b"requests", self.rpm)
        if self.tpm:
            self.tok_rate = self.tpm / 60.0
            self.tok_capacity = float(self.tpm)
            self.tok_lines_ms, self.tok_lines = _limit_lines(b"tokens", self.tpm)
        # (a full request bucket keeps all but one request, back in 1/rate seconds; a full
        # token bucket is charged only when the request ends)
        if self.req_rate:
            self.req_full_from = self.req_capacity
            left = self.req_left_full = self.req_capacity - 1.0
            self.full_lines = filled(
                self.req_lines_ms, self.req_lines, left, (self.req_capacity - left) / self.req_rate
            )
        if self.tok_rate:
            self.tok_level_full = self.tok_full_from = self.tok_capacity
            self.full_lines += filled(self.tok_lines_ms, self.tok_lines, self.tok_capacity, 0.0)
        if self.models is None:
            return
        globs = [p for p in self.models if _GLOB.search(p)]
        self._exact = frozenset(p for p in self.models if not _GLOB.search(p))
        if globs:
            self._glob = re.compile("|".join(f"(?:{translate(p)})" for p in globs))
        # The pass-through reaches every model of an engine: only a pattern that covers the
        # engine's whole model space (``flm://engine/*``) lets a key through to it.
        whole = [_engine_of(p) for p in self.models if p.endswith("/*")]
        if whole:
            self._whole_engines = re.compile("|".join(f"(?:{translate(e)})" for e in whole))

    def allows_model(self, model_id: str) -> bool:
        if self.models is None:
            return True
        answer = self._answers.get(model_id)
        if answer is None:
            answer = model_id in self._exact or (
                self._glob is not None and self._glob.match(model_id) is not None
            )
            remember(self._answers, model_id, answer, 1024)
        return answer

    def allows(self, engine_id: str, model: str) -> bool:
        """:meth:`allows_model` for ``flm://engine_id/model``, remembered by the pair (the
        request path knows the two parts; no id is built for a known pair)."""
        answer = self._pairs.get((engine_id, model))
        if answer is None:
            answer = self.allows_model(make_model_id(engine_id, model))
            remember(self._pairs, (engine_id, model), answer, 1024)
        return answer

    def allows_engine(self, engine_id: str) -> bool:
        """Whether the key may use the engine's native API (``/engine/{id}/...``)."""
        if self.models is None:
            return True
        answer = self._engines.get(engine_id)
        if answer is None:
            answer = (
                self._whole_engines is not None and self._whole_engines.match(engine_id) is not None
            )
            remember(self._engines, engine_id, answer, 256)
        return answer
