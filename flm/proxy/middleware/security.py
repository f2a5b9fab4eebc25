"""The security layers of SPEC §4.1 and §5, between the error layer and the router: IP block
check, resource protection, intrusion and honeypots, anomaly detection, IP allow-list, per-IP
rate limit, CORS, authentication and the per-key rate limit.

They run as **one** ASGI middleware whose ``__call__`` takes the steps in that order, top to
bottom. As nine nested middlewares each request paid for nine coroutines, nine lookups of the
same policy and state, and five walks over the header list; here the headers are read once and
a request that passes every check costs a few dictionary operations. Refusals leave as early
as before, by raising the :class:`HttpError` the error layer turns into the JSON contract, and
never reach an engine or the database."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from typing import TYPE_CHECKING

from flm.core.clients import subject
from flm.core.keyscope import KeyScope
from flm.core.policy import EffectivePolicy
from flm.openai.errors import HttpError, NoSuchRoute
from flm.proxy.asgi import (
    ASGIApp,
    Message,
    Receive,
    RequestState,
    Scope,
    Send,
    header_index,
)
from flm.proxy.guard import (
    ANOMALY_BLOCK_S,
    FAILURE_WINDOW_S,
    HONEYPOT_SCORE,
    HONEYPOTS,
    INTRUSION_BLOCK_S,
    INTRUSION_LONG_BLOCK_S,
    NOT_FOUND_SCORE,
    SCORE_WINDOW_S,
    SECOND_STAGE_S,
    Block,
    exempt_from_automatic_blocks,
    score_request,
)
from flm.proxy.keys import VerifyBusy
from flm.proxy.runtime import ProxyRuntime
from flm.proxy.usage import BEARER_CHALLENGE, key_expired
from flm.state import BackendDown

if TYPE_CHECKING:
    from flm.proxy.shared import SharedGuard

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_KEY_LENGTH = 256
_ALLOW_HEADERS = b"authorization, content-type, x-request-id"
_ALLOW_METHODS = b"GET, POST, OPTIONS"


class _Membership:
    """Remembers which addresses are in one tuple of networks (the policy's allow-list or
    trusted proxies): parsing an address costs more than the rest of the check. Starts over
    when the policy hands in a different tuple, and when it has seen too many addresses."""

    __slots__ = ("answers", "networks")

    def __init__(self) -> None:
        self.networks: tuple[_Net, ...] = ()
        self.answers: dict[str, bool] = {}

    def __call__(self, ip: str, networks: tuple[_Net, ...]) -> bool:
        if networks is not self.networks:
            self.networks = networks
            self.answers = {}
        answer = self.answers.get(ip)
        if answer is None:
            answer = _in(ip, networks)
            if len(self.answers) >= 4096:
                self.answers = {}
            self.answers[ip] = answer
        return answer


def _in(ip: str, networks: tuple[_Net, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def _hop_address(hop: str) -> str | None:
    """The address of one forwarding hop, in its canonical text (a port, ``[v6]:port`` and
    the IPv4-mapped IPv6 form taken off), or None when it is not an address."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1 : hop.find("]")] if "]" in hop else hop
    elif hop.count(":") == 1:  # IPv4:port
        hop = hop.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def forwarded_client(
    peer: str,
    forwarded: list[bytes],
    real_ip: list[bytes],
    trusted: tuple[_Net, ...],
    header: str = "x-forwarded-for",
) -> str | None:
    """The client behind a trusted proxy ``peer``, read from the one ``header`` the proxy
    sets (the policy's ``forwarded_header``); the other is never read, since a client can
    send it. ``None`` when the proxy's client cannot be known (an unparsable hop): the
    request is refused, and the proxy is not blamed for it.

    ``x-forwarded-for``: the right-most hop that is not itself a trusted proxy. Every line
    counts, in order, as one list (RFC 9110 §5.3): a proxy that adds its own line below the
    client's must not leave the client's line to decide. ``x-real-ip``: the last line, the
    one nearest to this gateway. No such header: the request is the proxy's own."""
    if header == "x-real-ip":
        if not real_ip:
            return peer
        return _hop_address(real_ip[-1].decode("latin-1"))
    if not forwarded:
        return peer
    hops = [h for line in forwarded for h in line.decode("latin-1").split(",") if h.strip()]
    if not hops:
        return peer
    for hop in reversed(hops):
        address = _hop_address(hop)
        if address is None:
            return None
        if not _in(address, trusted):
            return address
    return _hop_address(hops[0])


def record_block(
    rt: ProxyRuntime,
    ip: str,
    block: Block,
    *,
    failures: int | None = None,
    request_id: str | None = None,
) -> None:
    """Persist a block (through the audit sink) and record the ``ip_blocked`` event (with
    ``failures`` when auth failures made it). The blocklist row names what is blocked: the
    address, or for IPv6 its /64."""
    if rt.audit is not None:
        who = subject(ip)
        count = rt.guard.failures.get(who, (0, 0.0))[0] if failures is None else failures
        # (the listener whose rules made the block, or '*' when the policy shares blocks)
        listener = "*" if rt.effective.shared_blocks else rt.settings.handle_id
        rt.audit.block(who, block.reason, block.since, block.until, count, listener)
        details: dict[str, object] = {"reason": block.reason}
        if failures is not None:
            details["failures"] = failures
        details["permanent"] = block.permanent
        if who != ip:
            details["blocked"] = who
        rt.audit.event("ip_blocked", "high", ip, details, request_id)


def _blocked_error(block: Block, now: float) -> HttpError:
    retry = block.retry_after(now)
    headers = [(b"retry-after", str(retry).encode())] if retry else []
    return HttpError(403, "ip_blocked", "this address is blocked", headers)


def _limited(seconds: float, scope_name: str) -> HttpError:
    retry = max(1, math.ceil(seconds))
    return HttpError(
        429,
        "rate_limited",
        f"{scope_name} rate limit exceeded; retry in {retry} s",
        [(b"retry-after", str(retry).encode())],
    )


class _AuthFailed(HttpError):
    """A 401 whose failure is counted (toward the auto-block) where it is caught."""

    def __init__(self, message: str) -> None:
        super().__init__(401, "invalid_api_key", message, BEARER_CHALLENGE)
        self.reason = message


def _state_unavailable() -> HttpError:
    return HttpError(
        503,
        "state_backend_unavailable",
        "the gateway's shared state backend is unreachable; retry shortly",
        [(b"retry-after", b"5")],
    )


def _busy(holder: str) -> HttpError:
    return HttpError(
        429,
        "rate_limited",
        f"too many requests in flight for {holder}; retry shortly",
        [(b"retry-after", b"1")],
    )


def _verify_busy(busy: VerifyBusy) -> HttpError:
    """Too many key verifies at once: from this address (429) or from everyone (503)."""
    if busy.per_address:
        return HttpError(
            429,
            "rate_limited",
            "too many key checks from this address at once; retry shortly",
            [(b"retry-after", b"1")],
        )
    return HttpError(
        503, "overloaded", "too many key checks at once; retry shortly", [(b"retry-after", b"1")]
    )


def _cors_origin(origin: bytes, policy: EffectivePolicy) -> bytes | None:
    """The ``Access-Control-Allow-Origin`` value for ``origin``, or None when not allowed."""
    origins = policy.allowed_origins
    if not origins:
        return None  # no CORS unless the policy lists origins
    if "*" in origins:
        return b"*"
    return origin if origin.decode("latin-1") in origins else None


def _authorization(index: dict[bytes, bytes], headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Every Authorization value of a request (more than one is refused)."""
    first = index.get(b"authorization")
    if first is None:
        return []
    if len(index) == len(headers):  # no header name repeats
        return [first]
    return [v for n, v in headers if n == b"authorization"]


class SecurityMiddleware:
    """Steps 4–12 of :func:`flm.proxy.app.build_app`, in that order."""

    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self._allowed = _Membership()
        self._trusted = _Membership()
        self._trusted_clients = _Membership()
        self._monitor: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rt = self.runtime
        policy = rt.effective
        guard = rt.guard
        state: RequestState = scope["flm"]
        path: str = scope["path"]
        headers = header_index(scope)  # (the first of a repeated header counts)
        agent = headers.get(b"user-agent", b"")

        # 4. IP block check: resolve the client (behind trusted proxies only), refuse blocks.
        ip = state.client_ip
        if policy.trusted_proxies and self._trusted(ip, policy.trusted_proxies):
            every = scope["headers"]
            client = forwarded_client(
                ip,
                [v for n, v in every if n == b"x-forwarded-for"],
                [v for n, v in every if n == b"x-real-ip"],
                policy.trusted_proxies,
                policy.forwarded_header,
            )
            if client is None:
                raise HttpError(
                    400,
                    "invalid_request",
                    "the trusted proxy's forwarded client address cannot be parsed",
                )
            ip = state.client_ip = client
        # Trusted clients (policy ``trusted_clients``) are never blocked or scored.
        trusted = bool(policy.trusted_clients) and self._trusted_clients(ip, policy.trusted_clients)
        if guard.blocks and not trusted:
            block = guard.blocked(ip)
            if block is not None:
                rt.metrics.blocks.labels(block.reason).inc()
                raise _blocked_error(block, guard.clock())

        # Shared state (``--state-backend``): what guards access is checked in Redis, in one
        # call once the key is known; while Redis is unreachable such requests are refused
        # (fail closed) or checked on this process's state (``--state-fail-open``).
        keyed = path != "/health" and not (path == "/metrics" and rt.settings.loopback_only)
        shared = rt.shared
        sharing = False
        if shared is not None and keyed:
            if shared.available:
                sharing = True
            elif shared.config.fail_open:
                shared.serving_open()
            else:
                raise _state_unavailable()

        # 5. Resource protection: 503 while FLM is overloaded (its event-loop lag or memory;
        #    the host's CPU/memory only when the policy sets thresholds) or max_connections
        #    are in flight (counted below, once the request is let in), 429 past an address's
        #    or a key's fair share; running requests carry on.
        counted = policy.resource_enabled and path != "/health"
        who = ""  # ("ip:<subject>", the address's key in the guard's tables, once needed)
        if counted:
            if self._monitor is None:
                self._monitor = asyncio.ensure_future(self._watch())
                rt.tasks.append(self._monitor)
            if guard.overloaded or guard.connections >= policy.max_connections:
                raise HttpError(
                    503,
                    "overloaded",
                    "the gateway is at capacity; retry shortly",
                    [(b"retry-after", b"5")],
                )
            # (a fair share: one address never holds every slot)
            who = "ip:" + subject(ip)
            if guard.in_flight.get(who, 0) >= policy.max_connections_per_address:
                raise _busy("this address")

        # 6. Intrusion and honeypots: honeypot paths answer a plain 404 and score the caller;
        #    attack-shaped paths, queries and scanner user agents score (404s score below).
        if policy.honeypot_enabled and path.rstrip("/").lower() in HONEYPOTS:
            if not trusted:
                await self._score(scope, state, agent, HONEYPOT_SCORE, ("honeypot",))
            raise NoSuchRoute()  # (scored once, here: it is raised before the route runs)
        intrusion = policy.intrusion_enabled and not trusted
        if intrusion:
            score = score_request(
                scope.get("raw_path") or path.encode(), scope.get("query_string", b""), agent
            )
            if score.points:
                block = await self._score(scope, state, agent, score.points, score.reasons)
                if block is not None:
                    raise _blocked_error(block, guard.clock())

        # 7. Anomaly detection: request rate per address and declared body size now, the
        #    duration once the request is over.
        anomaly = policy.anomaly_enabled and path != "/health" and not trusted  # (health polls)
        if anomaly:
            self._anomalies_before(state, headers, policy)

        if counted:
            guard.connections += 1
            guard.enter(who)
        key_slot: str | None = None
        started = time.monotonic()
        cors_allowed: bytes | None = None
        try:
            # 8. IP allow-list
            if policy.whitelist and not self._allowed(ip, policy.whitelist):
                raise HttpError(403, "ip_not_allowed", "this address is not allowed")

            # 9. Per-IP rate limit
            if policy.ip_rate_enabled and path != "/health" and not sharing:
                wait = guard.take(who or "ip:" + subject(ip), policy.ip_rpm, policy.ip_burst)
                if wait:
                    rt.metrics.rate_limited.labels("ip").inc()
                    raise _limited(wait, "per-address")

            # 10. CORS: a preflight is answered here, without a key; allowed origins get the
            #     CORS headers on every response.
            origin = headers.get(b"origin")
            if origin is not None:
                # (/metrics is for scrapers: never readable by a web page, whatever the list)
                allowed = None if path == "/metrics" else _cors_origin(origin, policy)
                if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
                    await _preflight(send, allowed)
                    return
                if allowed is not None:
                    send = _with_cors(send, allowed)
                    cors_allowed = allowed

            # 11. Authentication: Bearer API key on every route but /health (and /metrics on
            #     a loopback-only proxy); failures feed the auto-block.
            if keyed:
                try:
                    presented = self._presented_key(headers, scope["headers"])
                    keys = rt.keys
                    # A key seen before answers from the cache without a coroutine; verify()
                    # handles the rest (unknown keys, Argon2 once, the negative cache).
                    key_id = keys.check_cached(presented)[1]
                    if key_id is None:
                        try:
                            key_id = await keys.verify(presented, subject(ip))
                        except VerifyBusy as busy:
                            raise _verify_busy(busy) from None
                        if key_id is None:
                            raise _AuthFailed("invalid API key")
                    state.api_key_id = key_id
                    key = rt.scopes.get(key_id) or await rt.scope_of(key_id)
                    if key is None:  # revoked since it was verified
                        raise _AuthFailed("invalid API key")
                    if sharing:
                        assert shared is not None
                        sharing = await self._admit_shared(shared, ip, key_id, key, trusted)
                except _AuthFailed as failure:
                    raise await self._count_failure(scope, state, failure, sharing) from None
                holder = "key:" + key_id
                if counted:  # (the key's fair share of the slots)
                    if guard.in_flight.get(holder, 0) >= policy.max_connections_per_key:
                        raise _busy("this API key")
                    key_slot = holder
                    guard.enter(holder)

                # 12. Per-key rate limit: the policy's, then the key's own expiry, read-only
                #     flag, limits and budgets (a key without any costs one attribute read)
                if policy.key_rpm > 0 and not sharing:
                    wait = guard.take(holder, policy.key_rpm, policy.key_burst)
                    if wait:
                        rt.metrics.rate_limited.labels("key").inc()
                        raise _limited(wait, "per-key")
                if key.admit_only:  # (limits: the ledger checks the expiry as well)
                    state.key_lines = rt.ledger.admit(key, path)
                elif key.checked:
                    self._check_key(key, path, state)
                state.key = key

            # 13. The route
            await self.app(scope, receive, send)
        except HttpError as exc:
            # probing for routes that do not exist scores too (an engine's own 404 through
            # the pass-through, or an unknown model, is an answer, not a probe)
            if intrusion and isinstance(exc, NoSuchRoute):
                await self._score(scope, state, agent, NOT_FOUND_SCORE, ("not_found_probe",))
            # a refusal from here on (401, 429, a route's error) is sent by an outer layer
            # that never saw the CORS wrapper: it carries the headers itself, so a browser
            # page (the web UI's chat tester) can read the error and its request id
            if cors_allowed is not None:
                exc.headers = [*exc.headers, *_cors_headers(cors_allowed)]
            raise
        finally:
            if counted:
                guard.connections -= 1
                guard.leave(who)
                if key_slot is not None:
                    guard.leave(key_slot)
            if anomaly:
                elapsed = time.monotonic() - started
                if elapsed > policy.max_duration_s:
                    self._anomaly(
                        ip, "duration", round(elapsed, 3), policy.max_duration_s, state.request_id
                    )

    # -- the rarer paths ----------------------------------------------------------------------

    def _check_key(self, key: KeyScope, path: str, state: RequestState) -> None:
        """A key's expiry, read-only flag, per-minute limits and daily budgets: the
        refusal to raise, else the ``x-ratelimit-*`` header lines for the reply in ``state``."""
        rt = self.runtime
        if rt.guard.clock() >= key.expires_cap:
            raise key_expired()
        if key.read_only and not (path == "/v1/models" or path.startswith("/v1/models/")):
            raise HttpError(
                403, "read_only_key", "this API key may only list models (GET /v1/models)"
            )
        if key.limits:
            state.key_lines = rt.ledger.admit(key, path)

    @staticmethod
    def _presented_key(headers: dict[bytes, bytes], every: list[tuple[bytes, bytes]]) -> str:
        """The key in the one ``Authorization: Bearer`` header, or a 401 to raise."""
        values = _authorization(headers, every)
        if not values:
            raise _AuthFailed("missing API key (send Authorization: Bearer <key>)")
        if len(values) > 1:
            raise _AuthFailed("more than one Authorization header")
        scheme, _, token = values[0].partition(b" ")
        if scheme.lower() != b"bearer" or not token or len(token) > MAX_KEY_LENGTH:
            raise _AuthFailed("malformed Authorization header (expected Bearer <key>)")
        try:
            return token.strip().decode("ascii")
        except UnicodeDecodeError:
            raise _AuthFailed("malformed API key") from None

    async def _admit_shared(
        self, shared: SharedGuard, ip: str, key_id: str, key: KeyScope, trusted: bool
    ) -> bool:
        """The shared checks of a request with a valid key, in one call: the address's
        block, the key's revocation, the per-address, per-key and key's own request buckets.
        False when Redis went away meanwhile and the request goes on on local state (fail
        open)."""
        rt = self.runtime
        policy = rt.effective
        who = subject(ip)
        try:
            verdict = await shared.admit(
                who,
                key_id,
                (policy.ip_rpm, policy.ip_burst) if policy.ip_rate_enabled else (0, 0),
                (policy.key_rpm, policy.key_burst) if policy.key_rpm > 0 else (0, 0),
                (key.rpm, key.burst or key.rpm) if key.rpm else (0, 0),
                not trusted,
            )
        except BackendDown:
            if not shared.config.fail_open:
                raise _state_unavailable() from None
            shared.serving_open()
            if policy.ip_rate_enabled:  # (skipped above while Redis answered)
                wait = rt.guard.take("ip:" + who, policy.ip_rpm, policy.ip_burst)
                if wait:
                    rt.metrics.rate_limited.labels("ip").inc()
                    raise _limited(wait, "per-address") from None
            return False
        if verdict[0] == "block":
            until = float(verdict[2]) if verdict[2] else None
            block = shared.apply_block(who, (verdict[1], until, float(verdict[3])))
            rt.metrics.blocks.labels(block.reason).inc()
            raise _blocked_error(block, rt.guard.clock())
        if verdict[4] == "1":  # revoked through another process
            rt.keys.invalidate(key_id)
            rt.scopes.pop(key_id, None)
            raise _AuthFailed("invalid API key")
        if verdict[1] != "0":
            rt.metrics.rate_limited.labels("ip").inc()
            raise _limited(float(verdict[1]), "per-address")
        if verdict[2] != "0":
            rt.metrics.rate_limited.labels("key").inc()
            raise _limited(float(verdict[2]), "per-key")
        if verdict[3] != "0":
            rt.metrics.rate_limited.labels("key").inc()
            retry = max(1, math.ceil(float(verdict[3])))
            raise HttpError(
                429,
                "rate_limited",
                f"the key's per-minute limit is reached; retry in {retry} s",
                [(b"retry-after", str(retry).encode())],
            )
        return True

    async def _count_failure(
        self, scope: Scope, state: RequestState, failure: _AuthFailed, sharing: bool
    ) -> HttpError:
        """Count an auth failure toward the auto-block (in Redis when the state is shared)
        and record it; the 401 to raise."""
        rt = self.runtime
        rt.metrics.auth_failures.inc()
        ip = state.client_ip
        policy = rt.effective
        shared = rt.shared
        block: Block | None
        if policy.trusted_clients and self._trusted_clients(ip, policy.trusted_clients):
            count, block = 0, None  # a trusted client's failures never count towards a block
        elif sharing and shared is not None and shared.available:
            who = subject(ip)
            try:
                count, found = await shared.backend.auth_failure(
                    who,
                    window_s=FAILURE_WINDOW_S,
                    enabled=policy.blocklist_enabled,
                    max_failures=policy.max_failures,
                    first_s=policy.block_minutes * 60.0,
                    second_s=SECOND_STAGE_S,
                    permanent=policy.permanent_threshold,
                    exempt=exempt_from_automatic_blocks(ip, policy),
                )
            except BackendDown:
                count, block = rt.guard.auth_failure(ip, policy)
            else:
                block = None if found is None else shared.apply_block(who, found)
        else:
            count, block = rt.guard.auth_failure(ip, policy)
        message = failure.reason
        if rt.audit is not None:
            rt.audit.event(
                "auth_failure",
                "medium" if block else "low",
                ip,
                {"failures": count, "reason": message},
                state.request_id,
                scope["path"],
            )
            if block is not None:
                record_block(rt, ip, block, failures=count, request_id=state.request_id)
        return HttpError(401, "invalid_api_key", message, BEARER_CHALLENGE)

    async def _score(
        self, scope: Scope, state: RequestState, agent: bytes, points: int, reasons: tuple[str, ...]
    ) -> Block | None:
        rt = self.runtime
        shared = rt.shared
        total: int
        block: Block | None
        if shared is not None and shared.available:
            who = subject(state.client_ip)
            policy = rt.effective
            try:
                total, found = await shared.backend.add_score(
                    who,
                    points,
                    window_s=SCORE_WINDOW_S,
                    threshold=policy.score_threshold,
                    short_s=INTRUSION_BLOCK_S,
                    long_s=INTRUSION_LONG_BLOCK_S,
                    exempt=exempt_from_automatic_blocks(state.client_ip, policy),
                )
            except BackendDown:
                total, block = rt.guard.add_score(state.client_ip, points, rt.effective)
            else:
                block = None if found is None else shared.apply_block(who, found)
        else:
            total, block = rt.guard.add_score(state.client_ip, points, rt.effective)
        if rt.audit is not None:
            rt.audit.intrusion(
                state.client_ip,
                points,
                total,
                reasons,
                scope["path"],
                agent.decode("latin-1"),
                state.request_id,
            )
            severity = (
                "high"
                if block
                else ("medium" if total >= rt.effective.warning_threshold else "low")
            )
            rt.audit.event(
                "honeypot" if "honeypot" in reasons else "intrusion",
                severity,
                state.client_ip,
                {"points": points, "total": total, "reasons": list(reasons)},
                state.request_id,
                scope["path"],
            )
            if block is not None:
                record_block(rt, state.client_ip, block, request_id=state.request_id)
        return block

    def _anomalies_before(
        self, state: RequestState, headers: dict[bytes, bytes], policy: EffectivePolicy
    ) -> None:
        rt = self.runtime
        ip = state.client_ip
        declared = headers.get(b"content-length")
        rate = rt.guard.count_rate(ip)
        if rate == policy.request_rate_threshold + 1:
            self._anomaly(ip, "request_rate", rate, policy.request_rate_threshold, state.request_id)
        if (
            rate > policy.request_rate_threshold
            and policy.anomaly_auto_block
            and not self._known_key(headers)
        ):
            # (a client with a valid key is recorded, never auto-blocked for its rate: that
            # is the per-key rate limit's business)
            # once blocked, the block check refuses this address first: this runs once
            block = rt.guard.auto_block(ip, "anomaly", ANOMALY_BLOCK_S, policy)
            if block is not None:
                if rt.shared is not None and rt.shared.available:
                    rt.shared.push_block(subject(ip), block.reason, block.until)
                record_block(rt, ip, block, request_id=state.request_id)
                raise _blocked_error(block, rt.guard.clock())
        if declared is not None and declared.isdigit() and int(declared) > policy.max_body_bytes:
            self._anomaly(ip, "body_size", int(declared), policy.max_body_bytes, state.request_id)

    def _known_key(self, headers: dict[bytes, bytes]) -> bool:
        """Whether the request carries a key already verified (the cache: no Argon2)."""
        value = headers.get(b"authorization")
        if value is None:
            return False
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token or len(token) > MAX_KEY_LENGTH:
            return False
        presented = token.strip().decode("latin-1")
        return self.runtime.keys.check_cached(presented)[1] is not None

    def _anomaly(self, ip: str, kind: str, value: float, threshold: float, request_id: str) -> None:
        rt = self.runtime
        if rt.audit is not None:
            rt.audit.anomaly(ip, kind, value, threshold, request_id)
            rt.audit.event(
                "anomaly",
                "medium",
                ip,
                {"type": kind, "value": value, "threshold": threshold},
                request_id,
            )

    async def _watch(self) -> None:
        """Sample, once a second (never per request), what FLM itself controls: how late its
        event loop wakes up (lag) and its own resident memory; and, only when the policy sets
        their thresholds, the host's CPU and memory use."""
        import psutil

        me = psutil.Process()
        psutil.cpu_percent(None)
        loop = asyncio.get_running_loop()
        guard = self.runtime.guard
        while True:
            before = loop.time()
            await asyncio.sleep(1.0)
            lag_ms = max(0.0, (loop.time() - before - 1.0) * 1000)
            policy = self.runtime.effective
            rss_mb = me.memory_info().rss / (1024 * 1024)
            over = bool(policy.max_loop_lag_ms and lag_ms > policy.max_loop_lag_ms) or bool(
                policy.max_rss_mb and rss_mb > policy.max_rss_mb
            )
            # (strictly above: a threshold of 100 never trips, whatever the load)
            cpu = psutil.cpu_percent(None)
            if policy.cpu_threshold is not None and cpu > policy.cpu_threshold:
                over = True
            if (
                policy.memory_threshold is not None
                and psutil.virtual_memory().percent > policy.memory_threshold
            ):
                over = True
            guard.load = (lag_ms, rss_mb)
            guard.samples += 1
            guard.overloaded = policy.resource_enabled and over


async def _preflight(send: Send, allowed: bytes | None) -> None:
    headers = [(b"vary", b"origin"), (b"content-length", b"0")]
    status = 403
    if allowed is not None:
        status = 204
        headers += [
            (b"access-control-allow-origin", allowed),
            (b"access-control-allow-methods", _ALLOW_METHODS),
            (b"access-control-allow-headers", _ALLOW_HEADERS),
            (b"access-control-max-age", b"600"),
        ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _cors_headers(allowed: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"access-control-allow-origin", allowed),
        (b"access-control-expose-headers", b"x-request-id"),
        (b"vary", b"origin"),
    ]


def _with_cors(send: Send, allowed: bytes) -> Send:
    async def with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *_cors_headers(allowed)]
        await send(message)

    return with_cors
