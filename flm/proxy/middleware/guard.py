"""The security layers before authentication (SPEC §4.1 and §5): IP block check, resource
protection, intrusion and honeypots, anomaly detection, IP allow-list, per-IP rate limit; and
the per-key rate limit after it. Each refuses early, before any engine or database work."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time

from flm.core.policy import EffectivePolicy
from flm.openai.errors import HttpError
from flm.proxy.asgi import ASGIApp, Receive, Scope, Send, header, state_of
from flm.proxy.guard import (
    ANOMALY_BLOCK_S,
    HONEYPOT_SCORE,
    HONEYPOTS,
    NOT_FOUND_SCORE,
    Block,
    score_request,
)
from flm.proxy.runtime import ProxyRuntime

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def client_ip(scope: Scope, policy: EffectivePolicy) -> str:
    """The peer address, or the forwarded client when the peer is a trusted proxy."""
    client = scope.get("client")
    peer = client[0] if client else ""
    if not policy.trusted_proxies or not _in(peer, policy.trusted_proxies):
        return peer
    forwarded = header(scope, b"x-forwarded-for")
    if forwarded:
        # Walk from the right: the first address not itself a trusted proxy is the client.
        hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer
            if not _in(hop, policy.trusted_proxies):
                return hop
        return hops[0] if hops else peer
    real = header(scope, b"x-real-ip")
    if real:
        text = real.decode("latin-1").strip()
        try:
            ipaddress.ip_address(text)
            return text
        except ValueError:
            return peer
    return peer


def record_block(rt: ProxyRuntime, ip: str, block: Block) -> None:
    """Persist a block (through the audit sink) and record the ``ip_blocked`` event."""
    if rt.audit is not None:
        failures = rt.guard.failures.get(ip, (0, 0.0))[0]
        rt.audit.block(ip, block.reason, block.since, block.until, failures)
        rt.audit.event("ip_blocked", "high", ip, {"reason": block.reason,
                                                 "permanent": block.permanent})


def _blocked_error(block: Block, now: float) -> HttpError:
    retry = block.retry_after(now)
    headers = [(b"retry-after", str(retry).encode())] if retry else []
    return HttpError(403, "ip_blocked", "this address is blocked", headers)


class BlockCheckMiddleware:
    """Resolves the client address and refuses blocked clients before anything else."""

    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rt = self.runtime
        state = state_of(scope)
        ip = client_ip(scope, rt.effective)
        state.client_ip = ip
        block = rt.guard.blocked(ip) if rt.guard.blocks else None
        if block is not None:
            rt.metrics.blocks.labels(block.reason).inc()
            raise _blocked_error(block, rt.guard.clock())
        await self.app(scope, receive, send)


class ResourceMiddleware:
    """Above the CPU/memory thresholds or ``max_connections``: new requests get 503
    ``overloaded``; requests already running (streams) carry on."""

    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self._monitor: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        """Sample CPU and memory once a second (never per request)."""
        import psutil

        psutil.cpu_percent(None)
        while True:
            await asyncio.sleep(1.0)
            policy = self.runtime.effective
            cpu = psutil.cpu_percent(None)
            memory = psutil.virtual_memory().percent
            # strictly above: a threshold of 100 never trips, whatever the load
            self.runtime.guard.overloaded = policy.resource_enabled and (
                cpu > policy.cpu_threshold or memory > policy.memory_threshold)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.runtime
        policy = rt.effective
        if scope["type"] != "http" or not policy.resource_enabled or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        if self._monitor is None:
            self._monitor = asyncio.ensure_future(self._watch())
            rt.tasks.append(self._monitor)
        guard = rt.guard
        if guard.overloaded or guard.connections >= policy.max_connections:
            raise HttpError(503, "overloaded", "the gateway is at capacity; retry shortly",
                            [(b"retry-after", b"5")])
        guard.connections += 1
        try:
            await self.app(scope, receive, send)
        finally:
            guard.connections -= 1


class IntrusionMiddleware:
    """Honeypot paths answer a plain 404 and score the caller; attack-shaped paths, queries
    and scanner user agents score; repeated 404s score. Thresholds warn and block."""

    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime

    def _score(self, scope: Scope, points: int, reasons: tuple[str, ...]) -> Block | None:
        rt = self.runtime
        state = state_of(scope)
        total, block = rt.guard.add_score(state.client_ip, points, rt.effective)
        if rt.audit is not None:
            agent = (header(scope, b"user-agent") or b"").decode("latin-1")
            rt.audit.intrusion(state.client_ip, points, total, reasons, scope["path"], agent,
                               state.request_id)
            severity = "high" if block else (
                "medium" if total >= rt.effective.warning_threshold else "low")
            rt.audit.event("honeypot" if "honeypot" in reasons else "intrusion", severity,
                           state.client_ip, {"points": points, "total": total,
                                             "reasons": list(reasons)},
                           state.request_id, scope["path"])
            if block is not None:
                record_block(rt, state.client_ip, block)
        return block

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.runtime
        policy = rt.effective
        if scope["type"] != "http" or not (policy.intrusion_enabled or policy.honeypot_enabled):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if policy.honeypot_enabled and path.rstrip("/").lower() in HONEYPOTS:
            self._score(scope, HONEYPOT_SCORE, ("honeypot",))
            raise HttpError(404, "not_found", "no such route")
        if policy.intrusion_enabled:
            score = score_request(scope.get("raw_path") or path.encode(),
                                  scope.get("query_string", b""),
                                  header(scope, b"user-agent") or b"")
            if score.points:
                block = self._score(scope, score.points, score.reasons)
                if block is not None:
                    raise _blocked_error(block, rt.guard.clock())

            # probing for routes that do not exist scores too
            try:
                await self.app(scope, receive, send)
            except HttpError as exc:
                if exc.status == 404:
                    self._score(scope, NOT_FOUND_SCORE, ("not_found_probe",))
                raise
            if state_of(scope).status == 404:
                self._score(scope, NOT_FOUND_SCORE, ("not_found_probe",))
            return
        await self.app(scope, receive, send)


class AnomalyMiddleware:
    """Request rate per address, abnormal body sizes, abnormally long requests."""

    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime

    def _anomaly(self, ip: str, kind: str, value: float, threshold: float,
                 request_id: str) -> None:
        rt = self.runtime
        if rt.audit is not None:
            rt.audit.anomaly(ip, kind, value, threshold, request_id)
            rt.audit.event("anomaly", "medium", ip, {"type": kind, "value": value,
                                                    "threshold": threshold}, request_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.runtime
        policy = rt.effective
        if scope["type"] != "http" or not policy.anomaly_enabled:
            await self.app(scope, receive, send)
            return
        state = state_of(scope)
        ip = state.client_ip
        rate = rt.guard.count_rate(ip)
        if rate == policy.request_rate_threshold + 1:
            self._anomaly(ip, "request_rate", rate, policy.request_rate_threshold,
                          state.request_id)
        if rate > policy.request_rate_threshold and policy.anomaly_auto_block:
            # once blocked, the block check refuses this address first: this runs once
            block = rt.guard.block(ip, "anomaly", ANOMALY_BLOCK_S)
            record_block(rt, ip, block)
            raise _blocked_error(block, rt.guard.clock())
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > policy.max_body_bytes:
            self._anomaly(ip, "body_size", int(declared), policy.max_body_bytes,
                          state.request_id)
        started = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            elapsed = time.monotonic() - started
            if elapsed > policy.max_duration_s:
                self._anomaly(ip, "duration", round(elapsed, 3), policy.max_duration_s,
                              state.request_id)


class AllowListMiddleware:
    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self._allowed = _Membership()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        networks = self.runtime.effective.whitelist
        if scope["type"] == "http" and networks and not self._allowed(state_of(scope).client_ip,
                                                                        networks):
            raise HttpError(403, "ip_not_allowed", "this address is not allowed")
        await self.app(scope, receive, send)


def _limited(seconds: float, scope_name: str) -> HttpError:
    retry = max(1, math.ceil(seconds))
    return HttpError(429, "rate_limited", f"{scope_name} rate limit exceeded; retry in "
                     f"{retry} s", [(b"retry-after", str(retry).encode())])


class IpRateLimitMiddleware:
    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = self.runtime.effective
        if scope["type"] == "http" and policy.ip_rate_enabled and scope["path"] != "/health":
            wait = self.runtime.guard.take("ip:" + state_of(scope).client_ip, policy.ip_rpm,
                                           policy.ip_burst)
            if wait:
                self.runtime.metrics.rate_limited.labels("ip").inc()
                raise _limited(wait, "per-address")
        await self.app(scope, receive, send)


class KeyRateLimitMiddleware:
    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = self.runtime.effective
        key_id = state_of(scope).api_key_id if scope["type"] == "http" else None
        if key_id is not None and policy.key_rpm > 0:
            wait = self.runtime.guard.take("key:" + key_id, policy.key_rpm, policy.key_burst)
            if wait:
                self.runtime.metrics.rate_limited.labels("key").inc()
                raise _limited(wait, "per-key")
        await self.app(scope, receive, send)
