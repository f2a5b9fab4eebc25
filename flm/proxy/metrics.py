"""Prometheus metrics of one proxy process (its own registry, never the global one)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
#: At most this many label combinations are kept per metric (routes, statuses and engines are
#: few; the cap only bounds memory if something unexpected makes many).
MAX_SERIES = 10_000
#: Per-key token series (key label × model × direction) kept at most; the rest add up under
#: the key label and model ``other``.
MAX_KEY_SERIES = 2_000
_go_float: Any = floatToGoString  # (untyped) how Prometheus writes a bucket bound
#: Label values are cut to this many characters.
MAX_LABEL = 128


def label(value: str) -> str:
    """A label value that can always be written and stays small: at most :data:`MAX_LABEL`
    characters, everything unprintable (control characters, lone surrogates) escaped as
    ``\\uXXXX``. Labels come from FLM's own routes and engine ids; this keeps one unexpected
    value from breaking ``/metrics`` for every later reader."""
    if len(value) <= MAX_LABEL and value.isprintable():
        return value
    out = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in value[:MAX_LABEL])
    return out[:MAX_LABEL]


def _le(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return tuple(str(_go_float(b)) for b in (*bounds, float("inf")))


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * (size + 1)  # the last one is +Inf
        self.sum = 0.0


class _RequestCollector:
    """The per-request series, kept as plain numbers and turned into metric families only
    when ``/metrics`` is read: recording a request is a few list and dict operations, with no
    lock (everything runs on the proxy's event loop)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.overhead: dict[str, _Histogram] = {}
        self.ttft: dict[str, _Histogram] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.key_tokens: dict[tuple[str, str, str], int] = {}

    @staticmethod
    def observe(
        series: dict[str, _Histogram], label: str, bounds: tuple[float, ...], value: float
    ) -> None:
        hist = series.get(label)
        if hist is None:
            if len(series) >= MAX_SERIES:
                return
            hist = series[label] = _Histogram(len(bounds))
        hist.counts[bisect_left(bounds, value)] += 1
        hist.sum += value

    @staticmethod
    def _histogram(
        name: str, doc: str, label: str, series: dict[str, _Histogram], bounds: tuple[float, ...]
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=[label])
        for value, hist in series.items():
            running = 0
            buckets = []
            for bound, count in zip(_le(bounds), hist.counts, strict=True):
                running += count
                buckets.append((bound, running))
            family.add_metric([value], buckets, hist.sum)
        return family

    def describe(self) -> Iterator[Metric]:
        return self._families(empty=True)

    def collect(self) -> Iterator[Metric]:
        return self._families(empty=False)

    def _families(self, empty: bool) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "flm_requests_total", "Requests answered", labels=["route", "status", "engine"]
        )
        tokens = CounterMetricFamily(
            "flm_tokens_total", "Tokens reported by engines", labels=["engine", "direction"]
        )
        key_tokens = CounterMetricFamily(
            "flm_key_tokens_total",
            "Tokens used, by API key label and model",
            labels=["key", "model", "direction"],
        )
        if empty:
            yield requests
            yield HistogramMetricFamily("flm_request_duration_seconds", "", labels=["route"])
            yield HistogramMetricFamily("flm_overhead_seconds", "", labels=["route"])
            yield HistogramMetricFamily("flm_time_to_first_token_seconds", "", labels=["engine"])
            yield tokens
            yield key_tokens
            return
        for (route, status, engine), count in list(self.requests.items()):
            requests.add_metric([route, str(status), engine], count)
        yield requests
        yield self._histogram(
            "flm_request_duration_seconds",
            "Total request latency",
            "route",
            self.latency,
            _LATENCY_BUCKETS,
        )
        yield self._histogram(
            "flm_overhead_seconds",
            "Time spent in FLM itself (total minus engine time)",
            "route",
            self.overhead,
            _OVERHEAD_BUCKETS,
        )
        yield self._histogram(
            "flm_time_to_first_token_seconds",
            "Time from request to the first streamed chunk",
            "engine",
            self.ttft,
            _LATENCY_BUCKETS,
        )
        for (engine, direction), count in list(self.tokens.items()):
            tokens.add_metric([engine, direction], count)
        yield tokens
        for (key, model, direction), count in list(self.key_tokens.items()):
            key_tokens.add_metric([key, model, direction], count)
        yield key_tokens


class _StateCollector:
    """Where the gateway keeps its shared state and whether it answers: one series,
    ``backend`` is ``local`` or ``redis``."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("flm_state_backend_up", "", labels=["backend"])

    def collect(self) -> Iterator[Metric]:
        state = self._source()
        up = GaugeMetricFamily(
            "flm_state_backend_up",
            "1 when the state backend answers (the local one always does), 0 while it is "
            "unreachable",
            labels=["backend"],
        )
        backend = str(state.get("backend", "local"))
        up.add_metric([backend], 1 if backend == "local" or state.get("reachable") else 0)
        yield up


class _PoolCollector:
    """Per pool member: requests in flight and whether it is in rotation, read from the pools
    when ``/metrics`` is read. Labels are pool names and engine ids only (both bounded by
    configuration)."""

    def __init__(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("flm_pool_member_in_flight", "", labels=["pool", "member"])
        yield GaugeMetricFamily("flm_pool_member_up", "", labels=["pool", "member"])

    def collect(self) -> Iterator[Metric]:
        busy = GaugeMetricFamily(
            "flm_pool_member_in_flight",
            "Requests a pool member is serving",
            labels=["pool", "member"],
        )
        up = GaugeMetricFamily(
            "flm_pool_member_up",
            "1 when a pool member is in rotation, 0 while it is out",
            labels=["pool", "member"],
        )
        for pool in self._source():
            for member in pool["members"]:
                labels = [pool["name"], member["engine_id"]]
                busy.add_metric(labels, member["in_flight"])
                up.add_metric(labels, 1 if member["state"] == "up" else 0)
        yield busy
        yield up


class _AuditCollector:
    """The audit sink's condition (see :meth:`flm.proxy.audit.AuditSink.status`), read when
    ``/metrics`` is."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, Any]] | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        st = self.source()
        gauges = (
            ("flm_audit_unwritten_records", "Audit records not yet written", "unwritten"),
            (
                "flm_audit_queue_limit",
                "Unwritten audit records at which new requests wait",
                "limit",
            ),
            ("flm_audit_failing", "1 while audit writes fail (e.g. disk full)", "failing"),
        )
        for name, doc, key in gauges:
            yield GaugeMetricFamily(name, doc, value=float(st[key]))
        counters = (
            ("flm_audit_write_failures", "Failed audit writes", "write_failures"),
            (
                "flm_audit_delayed_records",
                "Audit records whose write failed and was retried",
                "delayed_records",
            ),
            (
                "flm_audit_lines_lost",
                "Audit records the JSON Lines file could not take",
                "lines_lost",
            ),
            (
                "flm_audit_refused_requests",
                "Requests refused while the audit was full",
                "refused_requests",
            ),
            (
                "flm_audit_backpressure_waits",
                "Requests that waited for audit room",
                "backpressure_waits",
            ),
            ("flm_audit_rows_escaped", "Audit rows written escaped", "rows_escaped"),
            ("flm_audit_gaps", "audit_gap events recorded", "gaps_recorded"),
            (
                "flm_audit_idle_promotions",
                "Times the audit's database writer, starved in the idle scheduling class, "
                "was put back at normal priority",
                "idle_promotions",
            ),
        )
        for name, doc, key in counters:
            yield CounterMetricFamily(name, doc, value=float(st[key]))


class Metrics:
    def watch_pools(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        """Export the pools ``source`` describes (see ``PoolSet.snapshot``)."""
        self.registry.register(_PoolCollector(source))

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._series = _RequestCollector()
        r = self.registry
        r.register(self._series)
        #: Requests answered by this process (``flm proxy status`` shows it per worker).
        self.served = 0
        self._audit = _AuditCollector()
        r.register(self._audit)
        self.active_streams = Gauge("flm_active_streams", "Streams in flight", registry=r)
        self.engine_up = Gauge(
            "flm_engine_healthy", "1 when the engine is usable", ["engine"], registry=r
        )
        self.auth_failures = Counter("flm_auth_failures_total", "Rejected credentials", registry=r)
        self.blocks = Counter(
            "flm_blocked_requests_total", "Requests refused by IP blocks", ["reason"], registry=r
        )
        self.rate_limited = Counter(
            "flm_rate_limited_total", "Requests refused by rate limits", ["scope"], registry=r
        )

    def watch_state(self, source: Callable[[], dict[str, Any]]) -> None:
        """Export the state backend ``source`` describes (``SharedGuard.describe``)."""
        self.registry.register(_StateCollector(source))

    def watch_audit(self, status: Callable[[], dict[str, Any]]) -> None:
        self._audit.source = status

    def record_request(
        self, route: str, status: int, engine: str, elapsed: float, overhead: float | None
    ) -> None:
        self.served += 1
        series = self._series
        key = (route, status, engine)
        count = series.requests.get(key)
        if count is not None:  # (a known series: its route and engine are labels already)
            series.requests[key] = count + 1
        else:
            route, engine = label(route), label(engine)
            key = (route, status, engine)
            count = series.requests.get(key)
            if count is not None:
                series.requests[key] = count + 1
            elif len(series.requests) < MAX_SERIES:
                series.requests[key] = 1
        series.observe(series.latency, route, _LATENCY_BUCKETS, elapsed)
        if overhead is not None:
            series.observe(series.overhead, route, _OVERHEAD_BUCKETS, max(overhead, 0.0))

    def record_ttft(self, engine: str, seconds: float) -> None:
        self._series.observe(self._series.ttft, label(engine), _LATENCY_BUCKETS, seconds)

    def record_tokens(self, engine: str, prompt: int | None, completion: int | None) -> None:
        tokens = self._series.tokens
        engine = label(engine)
        if len(tokens) >= MAX_SERIES and (engine, "in") not in tokens:
            return
        if prompt:
            tokens[(engine, "in")] = tokens.get((engine, "in"), 0) + prompt
        if completion:
            tokens[(engine, "out")] = tokens.get((engine, "out"), 0) + completion

    def record_key_tokens(self, label: str, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self._add_key_tokens(label, model, "in", prompt)
        if completion:
            self._add_key_tokens(label, model, "out", completion)

    def _add_key_tokens(self, label: str, model: str, direction: str, tokens: int) -> None:
        series = self._series.key_tokens
        key = (label, model, direction)
        total = series.get(key)
        if total is None and len(series) >= MAX_KEY_SERIES - 2:
            key = ("other", "other", direction)  # (the series are bounded)
            total = series.get(key)
        series[key] = (total or 0) + tokens

    def render(self) -> bytes:
        return generate_latest(self.registry)
