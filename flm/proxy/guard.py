"""In-memory protection state of one proxy: blocks, auth failures, intrusion scores, token
buckets and request-rate windows. Everything here is O(1) per request and never touches the
database on the request path; changes are handed to the audit sink, which persists them in
batches. The clock is injectable so tests can move time.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from flm.core.clients import subject
from flm.core.memo import remember
from flm.core.policy import EffectivePolicy

Clock = Callable[[], float]

#: Auto-block stages after auth failures: the first stage uses the policy's duration.
SECOND_STAGE_S = 24 * 3600.0
INTRUSION_BLOCK_S = 3600.0
INTRUSION_LONG_BLOCK_S = 24 * 3600.0
ANOMALY_BLOCK_S = 30 * 60.0
#: Intrusion scores fade: a score older than this window starts again from zero.
SCORE_WINDOW_S = 3600.0
#: Failure counts fade after a week without failures (longer than any temporary block).
FAILURE_WINDOW_S = 7 * 24 * 3600.0
MAX_TRACKED = 100_000

HONEYPOTS = frozenset(
    {"/admin", "/wp-admin", "/wp-login.php", "/phpmyadmin", "/.env", "/api/v1/users"}
)
HONEYPOT_SCORE = 75
NOT_FOUND_SCORE = 10

_SQLI = re.compile(
    r"(\bunion\b[\s/*+]+(all[\s/*+]+)?select\b|\bselect\b.+\bfrom\b|\bor\b\s*'?\d+'?\s*=\s*'?\d+"
    r"|'\s*or\s*'|\bdrop\s+table\b|\binsert\s+into\b|;\s*(shutdown|drop|delete)\b|--\s*$"
    r"|\bsleep\s*\(\s*\d+|\bbenchmark\s*\(|\bwaitfor\s+delay\b|/\*.*\*/|\bxp_cmdshell\b"
    r"|\binformation_schema\b|\bload_file\s*\()",
    re.IGNORECASE,
)
_TRAVERSAL_RAW = re.compile(
    r"(\.\./|\.\.\\|%2e%2e|%252e|\.%2e|%2e\.|%c0%ae|%c0%af|%e0%80%ae|%5c\.\.|/etc/passwd"
    r"|/proc/self"
    r"|boot\.ini|win\.ini|%00)",
    re.IGNORECASE,
)
_PLAIN_PATH = re.compile(rb"(/[A-Za-z0-9_\-]+)+/?|/")
_SCANNERS = re.compile(
    r"(sqlmap|nikto|nmap|masscan|zgrab|gobuster|dirbuster|dirb/|wpscan|nuclei|acunetix|nessus"
    r"|openvas|w3af|havij|fimap|hydra|zmeu|morfeus|jorgee|netsparker|whatweb|feroxbuster|ffuf)",
    re.IGNORECASE,
)


def _loopback(ip: str) -> bool:
    try:
        if "/" in ip:  # (an IPv6 client's /64, as blocks name it)
            return ipaddress.ip_network(ip, strict=False).is_loopback
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def exempt_from_automatic_blocks(ip: str, policy: EffectivePolicy) -> bool:
    """Whether automatic rules (auth-failure auto-block, intrusion scores, honeypots, anomaly
    auto-block) may never block ``ip``: loopback, the machine's owner, unless the policy turns
    that off (``ip_blocklist.exempt_loopback``). Such a client is still counted, scored and
    recorded; it is only never blocked. The one place that decides it."""
    return policy.exempt_loopback and _loopback(ip)


@dataclass
class Block:
    reason: str
    until: float | None  # None = permanent
    since: float

    @property
    def permanent(self) -> bool:
        return self.until is None

    def outlasts(self, until: float | None) -> bool:
        """Whether this block runs at least as long as one ending at ``until`` (None:
        never)."""
        return self.until is None or (until is not None and self.until >= until)

    def retry_after(self, now: float) -> int | None:
        return None if self.until is None else max(1, math.ceil(self.until - now))


@dataclass(frozen=True)
class Score:
    points: int
    reasons: tuple[str, ...]


_CLEAN = Score(0, ())
_SCORED: dict[tuple[bytes, bytes, bytes], Score] = {}


def score_request(raw_path: bytes, query: bytes, user_agent: bytes) -> Score:
    """Intrusion points for what a request looks like: path, query string and user agent.
    Bodies are never scored: a prompt that *mentions* SQL or ``../`` is not an attack.
    Answers are remembered: clients repeat the same few requests (a flood of distinct ones
    only empties the memory now and then)."""
    key = (raw_path, query, user_agent)
    score = _SCORED.get(key)
    if score is None:
        score = _score(raw_path, query, user_agent)
        if len(raw_path) + len(query) + len(user_agent) <= 1024:  # long ones are not kept
            remember(_SCORED, key, score)
    return score


def _score(raw_path: bytes, query: bytes, user_agent: bytes) -> Score:
    points = 0
    reasons: list[str] = []
    if user_agent and _SCANNERS.search(user_agent.decode("latin-1")) is not None:
        points += 50
        reasons.append("scanner_user_agent")
    if not query and raw_path.isascii() and _PLAIN_PATH.fullmatch(raw_path):
        # a plain path: nothing to decode or match
        return Score(points, tuple(reasons)) if points else _CLEAN
    target = raw_path.decode("latin-1")
    q = query.decode("latin-1")
    decoded = unquote_plus(unquote_plus(target + "?" + q))
    if (
        _TRAVERSAL_RAW.search(target)
        or _TRAVERSAL_RAW.search(q)
        or "../" in decoded
        or "..\\" in decoded
    ):
        points += 60
        reasons.append("path_traversal")
    if _SQLI.search(decoded):
        points += 60
        reasons.append("sql_injection")
    return Score(points, tuple(reasons)) if points else _CLEAN


class TokenBucket:
    """``burst`` tokens, refilled at ``rpm`` per minute."""

    __slots__ = ("burst", "rate", "rpm", "tokens", "updated")

    def __init__(self, rpm: int, burst: int, now: float) -> None:
        self.rpm = rpm
        self.burst = burst
        self.rate = rpm / 60.0
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """0 when a token was taken, else seconds until one is available."""
        elapsed = now - self.updated
        if elapsed > 0:
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else float(self.burst)
            self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate > 0 else 60.0


class GuardState:
    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self.blocks: dict[str, Block] = {}
        #: the addresses in the persisted blocklist at the last load, expired blocks included
        self.listed: set[str] = set()
        self.failures: dict[str, tuple[int, float]] = {}
        self.scores: dict[str, tuple[int, float]] = {}
        self.buckets: dict[str, TokenBucket] = {}
        #: ip → [window start, requests in it] (updated in place)
        self.windows: dict[str, list[float]] = {}
        self.connections = 0
        #: requests in flight per ``ip:<subject>`` and per ``key:<id>`` (entries at zero go)
        self.in_flight: dict[str, int] = {}
        self.overloaded = False
        #: the resource monitor's last (event-loop lag in ms, own RSS in MiB), and how many
        #: times it has sampled
        self.load: tuple[float, float] = (0.0, 0.0)
        self.samples = 0

    def enter(self, holder: str) -> None:
        self.in_flight[holder] = self.in_flight.get(holder, 0) + 1

    def leave(self, holder: str) -> None:
        left = self.in_flight.get(holder, 1) - 1
        if left > 0:
            self.in_flight[holder] = left
        else:
            self.in_flight.pop(holder, None)

    # --- blocks ------------------------------------------------------------------------------

    # (every method taking ``ip`` keys its state by :func:`subject`: an IPv6 client's /64)

    def blocked(self, ip: str) -> Block | None:
        ip = subject(ip)
        block = self.blocks.get(ip)
        if block is None:
            return None
        if block.until is not None and self.clock() >= block.until:
            del self.blocks[ip]
            return None
        return block

    def block(self, ip: str, reason: str, seconds: float | None) -> Block:
        ip = subject(ip)
        now = self.clock()
        current = self.blocks.get(ip)
        until = None if seconds is None else now + seconds
        if current is not None and current.outlasts(until):
            return current  # never shorten an existing block
        block = Block(reason, until, now)
        self.blocks[ip] = block
        return block

    def auto_block(
        self, ip: str, reason: str, seconds: float | None, policy: EffectivePolicy
    ) -> Block | None:
        """A block made by an automatic rule: none for an exempt address."""
        if exempt_from_automatic_blocks(ip, policy):
            return None
        return self.block(ip, reason, seconds)

    def unblock(self, ip: str) -> None:
        ip = subject(ip)
        self.blocks.pop(ip, None)
        self.failures.pop(ip, None)
        self.scores.pop(ip, None)

    def load_blocks(
        self,
        rows: list[tuple[str, str, float | None, float, int]],
        exempt: Callable[[str], bool] | None = None,
    ) -> None:
        """Make the persisted blocks authoritative: rows are (ip, reason, until, since,
        failure_count). An address blocked here but absent from the rows was unblocked by the
        owner: its block, failure count and score go. Rows of ``exempt`` addresses (made
        before they were exempt) are not applied."""
        now = self.clock()
        if exempt is not None:
            rows = [row for row in rows if not exempt(row[0])]
        # (rows written before IPv6 clients were keyed by /64 name single addresses)
        rows = [
            (subject(ip), reason, until, since, count) for ip, reason, until, since, count in rows
        ]
        persisted = {ip for ip, *_ in rows}
        # (an expired block is no longer in ``blocks`` but still in the table: unblocking it
        # there must clear its failure count too, or the next failures escalate from it)
        for ip in [ip for ip in {*self.blocks, *self.listed} if ip not in persisted]:
            self.unblock(ip)
        self.listed = persisted
        self.blocks = {}
        for ip, reason, until, since, _ in rows:
            if until is None or until > now:
                held = self.blocks.get(ip)  # (of two rows for one /64, the longer block)
                if held is None or not held.outlasts(until):
                    self.blocks[ip] = Block(reason, until, since)
        for ip, _r, _u, since, count in rows:
            current = self.failures.get(ip, (0, since))
            if count > current[0]:
                self.failures[ip] = (count, since)

    # --- auth failures -----------------------------------------------------------------------

    def auth_failure(self, ip: str, policy: EffectivePolicy) -> tuple[int, Block | None]:
        """Count a failure; the block it triggers (5 → policy minutes, 10 → 24 h, 20 →
        permanent), if any."""
        ip = subject(ip)
        now = self.clock()
        count, last = self.failures.get(ip, (0, now))
        if now - last > FAILURE_WINDOW_S:
            count = 0
        count += 1
        self._track(self.failures, ip, (count, now))
        if not policy.blocklist_enabled:
            return count, None
        # Each stage triggers once, on exactly its count (failures in between, after a block
        # has run out, are counted without a new block until the next stage).
        if count >= policy.permanent_threshold:
            return count, self.auto_block(ip, "auth_failures", None, policy)
        if count == 2 * policy.max_failures:
            return count, self.auto_block(ip, "auth_failures", SECOND_STAGE_S, policy)
        if count == policy.max_failures:
            return count, self.auto_block(ip, "auth_failures", policy.block_minutes * 60.0, policy)
        return count, None

    # --- intrusion ---------------------------------------------------------------------------

    def add_score(self, ip: str, points: int, policy: EffectivePolicy) -> tuple[int, Block | None]:
        ip = subject(ip)
        now = self.clock()
        total, last = self.scores.get(ip, (0, now))
        if now - last > SCORE_WINDOW_S:
            total = 0
        total += points
        self._track(self.scores, ip, (total, now))
        if total >= 2 * policy.score_threshold:
            return total, self.auto_block(ip, "intrusion", INTRUSION_LONG_BLOCK_S, policy)
        if total >= policy.score_threshold:
            return total, self.auto_block(ip, "intrusion", INTRUSION_BLOCK_S, policy)
        return total, None

    # --- rates -------------------------------------------------------------------------------

    def take(self, bucket: str, rpm: int, burst: int) -> float:
        now = self.clock()
        tb = self.buckets.get(bucket)
        if tb is None or tb.rpm != rpm or tb.burst != burst:  # new, or the policy changed
            old = tb
            tb = TokenBucket(rpm, burst, now)
            if old is not None:  # a new limit is no fresh start: what was spent stays spent
                refilled = old.tokens + max(0.0, now - old.updated) * old.rate
                tb.tokens = min(float(burst), float(old.burst), refilled)
            self._track(self.buckets, bucket, tb)
        return tb.take(now)

    def count_rate(self, ip: str) -> int:
        """Requests from ``ip`` in the current one-minute window."""
        ip = subject(ip)
        now = self.clock()
        window = self.windows.get(ip)
        if window is None:
            self._track(self.windows, ip, [now, 1])
            return 1
        if now - window[0] >= 60:
            window[0] = now
            window[1] = 0
        window[1] += 1
        return int(window[1])

    @staticmethod
    def _track(table: dict[str, Any], key: str, value: Any) -> None:
        if key not in table and len(table) >= MAX_TRACKED:
            table.pop(next(iter(table)))  # bounded memory under a flood of addresses
        table[key] = value
