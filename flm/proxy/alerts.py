"""Alert webhooks: high-severity security events sent off the request path.

:meth:`Alerter.offer` is what the request path calls (through the audit sink's listener): a
severity check and a deque append, no I/O, no lock. A dispatcher thread with its own event loop
takes the events every 100 ms and

- coalesces them per source (the client address, else the event type) for
  ``coalesce_seconds`` into one alert that counts each event type;
- deduplicates: after an alert for a source, its further events only count until
  ``dedup_seconds`` pass; the next alert for it says how many were held back;
- rate-limits all alerts to ``max_per_minute`` (a token bucket; the excess is counted and
  reported in the next alert that goes out);
- POSTs each alert to every webhook (generic JSON, Slack's ``{"text"}``, Discord's
  ``{"content"}``), retrying with exponential back-off; when every attempt failed it records
  an ``alert_delivery_failed`` security event, so the audit trail says what was not delivered
  (the events themselves are in the audit trail already: the sink wrote them).

Webhook targets are checked like image URLs: https to a public address (the name's addresses
are checked when it is resolved), unless the policy sets ``allow_private_targets``. Through a
SOCKS egress the request leaves the way all outbound traffic does (SPEC §7).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flm.core.alerts import (
    SEVERITIES,
    AlertSettings,
    Webhook,
    alert_rank,
    is_public,
    register_listener,
    unregister_listener,
    webhook_problem,
)
from flm.egress.config import EgressConfig

log = logging.getLogger("flm.alerts")

INBOX_LIMIT = 10_000
MAX_SOURCES = 4096
TICK_S = 0.1

#: ``(event_type, severity, details)`` -> recorded in the audit trail (blocking is fine: it is
#: called from the dispatcher thread).
Recorder = Callable[[str, str, dict[str, Any]], object]


@dataclass
class _Bucket:
    source: str
    opened: float
    first_at: float
    severity: int
    counts: dict[str, int] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)


def render(hook: Webhook, alert: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for one webhook's format."""
    text = alert["text"]
    if hook.format == "slack":
        return {"text": text}
    if hook.format == "discord":
        return {"content": text[:2000]}
    return alert


def _summary(source: str, counts: dict[str, int], severity: str, held_back: int) -> str:
    what = ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
    text = f"FLM {severity} alert: {what}"
    if source and not source.startswith("event:"):
        text += f" from {source}"
    if held_back:
        text += f" ({held_back} similar events held back since the last alert)"
    return text


class Alerter:
    """One per process that serves proxies; reconfigured on every policy change."""

    def __init__(
        self,
        recorder: Recorder | None = None,
        egress: EgressConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._recorder = recorder
        self._egress = egress or EgressConfig()
        self._clock = clock
        self._settings: AlertSettings | None = None
        self._inbox: deque[tuple[float, str, str, str, dict[str, Any]]] = deque(maxlen=INBOX_LIMIT)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # dispatcher-thread state
        self._buckets: dict[str, _Bucket] = {}
        self._quiet_until: dict[str, float] = {}
        self._held_back: dict[str, int] = {}
        self._tokens = 0.0
        self._refilled = 0.0
        self._rate_dropped = 0
        self._pending: set[asyncio.Task[None]] = set()
        #: What happened, for status and tests: alerts sent/failed, events held back/dropped.
        self.stats = {"sent": 0, "failed": 0, "deduplicated": 0, "rate_limited": 0}

    @property
    def settings(self) -> AlertSettings | None:
        return self._settings

    def configure(self, settings: AlertSettings | None) -> None:
        if settings is not None and self._settings is None:
            self._tokens = float(settings.max_per_minute)
            self._refilled = self._clock()
        self._settings = settings
        if not self._stop.is_set():
            register_listener(self.offer)

    # --- the request path ------------------------------------------------------------------

    def offer(
        self, event_type: str, severity: str, client_ip: str, details: dict[str, Any] | None = None
    ) -> None:
        """Queue an event if it is worth an alert (O(1), no I/O)."""
        settings = self._settings
        if settings is None or event_type.startswith("alert_"):
            return
        rank = alert_rank(event_type, severity)
        if rank < settings.min_rank:
            return
        self._inbox.append((time.time(), event_type, SEVERITIES[rank], client_ip, details or {}))
        if self._thread is None:
            self._start()

    # --- the dispatcher --------------------------------------------------------------------

    def _start(self) -> None:
        with _START_LOCK:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="flm-alerts", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        from flm.core.threads import background_thread

        background_thread()
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        while not self._stop.is_set():
            self._tick()
            await asyncio.sleep(TICK_S)
        self._tick(final=True)
        if self._pending:
            await asyncio.wait(self._pending, timeout=5)

    def _tick(self, *, final: bool = False) -> None:
        settings = self._settings
        now = self._clock()
        while self._inbox:
            wall, event_type, severity, ip, details = self._inbox.popleft()
            if settings is None:
                continue
            source = ip or f"event:{event_type}"
            if self._quiet_until.get(source, 0.0) > now:
                self._held_back[source] = self._held_back.get(source, 0) + 1
                self.stats["deduplicated"] += 1
                continue
            bucket = self._buckets.get(source)
            if bucket is None:
                if len(self._buckets) >= MAX_SOURCES:
                    self.stats["rate_limited"] += 1
                    continue
                bucket = self._buckets[source] = _Bucket(
                    source, now, wall, SEVERITIES.index(severity), sample=dict(details)
                )
            bucket.counts[event_type] = bucket.counts.get(event_type, 0) + 1
            bucket.severity = max(bucket.severity, SEVERITIES.index(severity))
        if settings is None:
            self._buckets.clear()
            return
        for source, bucket in list(self._buckets.items()):
            if final or now - bucket.opened >= settings.coalesce_seconds:
                del self._buckets[source]
                self._dispatch(settings, bucket, now)
        if len(self._quiet_until) > MAX_SOURCES:
            self._quiet_until = {k: v for k, v in self._quiet_until.items() if v > now}
            self._held_back = {k: v for k, v in self._held_back.items() if k in self._quiet_until}

    def _take_token(self, settings: AlertSettings, now: float) -> bool:
        rate = settings.max_per_minute / 60.0
        self._tokens = min(
            float(settings.max_per_minute), self._tokens + (now - self._refilled) * rate
        )
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _dispatch(self, settings: AlertSettings, bucket: _Bucket, now: float) -> None:
        if not self._take_token(settings, now):
            self._rate_dropped += sum(bucket.counts.values())
            self.stats["rate_limited"] += 1
            return
        self._quiet_until[bucket.source] = now + settings.dedup_seconds
        held_back = self._held_back.pop(bucket.source, 0) + self._rate_dropped
        self._rate_dropped = 0
        alert = build_alert(
            bucket.source,
            bucket.counts,
            SEVERITIES[bucket.severity],
            bucket.first_at,
            bucket.sample,
            held_back,
        )
        task = asyncio.ensure_future(self._deliver_all(settings, alert))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _deliver_all(self, settings: AlertSettings, alert: dict[str, Any]) -> None:
        results = await asyncio.gather(
            *(deliver(hook, alert, settings, self._egress) for hook in settings.webhooks)
        )
        for hook, (ok, error, attempts) in zip(settings.webhooks, results, strict=True):
            if ok:
                self.stats["sent"] += 1
                continue
            self.stats["failed"] += 1
            log.warning(
                "alert to %s not delivered after %d attempts: %s", hook.host, attempts, error
            )
            if self._recorder is not None:
                details = {
                    "webhook_host": hook.host,
                    "attempts": attempts,
                    "error": error,
                    "alert": {k: alert[k] for k in ("severity", "source", "events", "first_at")},
                }
                try:
                    await asyncio.to_thread(
                        self._recorder, "alert_delivery_failed", "medium", details
                    )
                except Exception:
                    log.exception("could not record an undelivered alert")

    def close(self, timeout: float = 10.0) -> None:
        """Send what is pending (one last try each) and stop the thread."""
        self._stop.set()
        unregister_listener(self.offer)
        if self._thread is not None:
            self._thread.join(timeout)


_START_LOCK = threading.Lock()


def build_alert(
    source: str,
    counts: dict[str, int],
    severity: str,
    first_at: float,
    sample: dict[str, Any],
    held_back: int = 0,
) -> dict[str, Any]:
    from datetime import UTC, datetime

    client = "" if source.startswith("event:") else source
    return {
        "source": "flm",
        "severity": severity,
        "client_ip": client or None,
        "events": dict(sorted(counts.items())),
        "count": sum(counts.values()),
        "held_back": held_back,
        "first_at": datetime.fromtimestamp(first_at, UTC).isoformat(timespec="milliseconds"),
        "details": sample,
        "text": _summary(client, counts, severity, held_back),
    }


async def deliver(
    hook: Webhook,
    alert: dict[str, Any],
    settings: AlertSettings,
    egress: EgressConfig | None = None,
) -> tuple[bool, str | None, int]:
    """POST ``alert`` to ``hook`` with retries and back-off: (delivered, last error,
    attempts)."""
    error: str | None = None
    for attempt in range(1, settings.retries + 1):
        error = await _post_once(hook, render(hook, alert), settings, egress)
        if error is None:
            return True, None, attempt
        if attempt < settings.retries:
            await asyncio.sleep(settings.backoff_seconds * (2 ** (attempt - 1)))
    return False, error, settings.retries


async def _post_once(
    hook: Webhook, body: dict[str, Any], settings: AlertSettings, egress: EgressConfig | None
) -> str | None:
    import aiohttp

    problem = webhook_problem(hook.url, allow_private=settings.allow_private_targets)
    if problem:
        return f"webhook {problem}"
    connector: aiohttp.BaseConnector | None = None
    if egress is not None and egress.uses_proxy:
        from flm.egress.connector import connector_for

        connector = connector_for(egress, hook.url)
    if connector is None:
        from flm.proxy.images import _CheckedResolver

        allowed: Callable[[Any], bool] = (
            (lambda _a: True) if settings.allow_private_targets else is_public
        )
        connector = aiohttp.TCPConnector(resolver=_CheckedResolver(allowed))
    timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
            session.post(
                hook.url,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "User-Agent": "flm-alerts"},
                allow_redirects=False,
            ) as resp,
        ):
            await resp.read()
            if 200 <= resp.status < 300:
                return None
            return f"HTTP {resp.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    except Exception as exc:
        from flm.egress.connector import PROXY_EXCEPTIONS

        if isinstance(exc, PROXY_EXCEPTIONS):
            return f"egress proxy: {exc}"[:300]
        raise


def send_test(settings: AlertSettings, egress: EgressConfig | None = None) -> list[dict[str, Any]]:
    """``flm security alerts test``: one sample alert to every webhook, now (no dedup)."""
    alert = build_alert(
        "203.0.113.7", {"honeypot": 1}, "high", time.time(), {"sample": True, "path": "/wp-admin"}
    )
    alert["text"] = "FLM test alert: alerts reach this webhook. " + alert["text"]

    async def run() -> list[tuple[bool, str | None, int]]:
        return list(
            await asyncio.gather(*(deliver(h, alert, settings, egress) for h in settings.webhooks))
        )

    results = asyncio.run(run())
    return [
        {"webhook_host": h.host, "format": h.format, "delivered": ok, "error": err, "attempts": n}
        for h, (ok, err, n) in zip(settings.webhooks, results, strict=True)
    ]
