"""Prometheus metrics of one proxy process (its own registry, never the global one)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                    10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, int, str], tuple[Any, Any, Any]] = {}
        self._engine_children: dict[str, tuple[Any, Any, Any]] = {}
        r = self.registry
        self.requests = Counter("flm_requests_total", "Requests answered",
                                ["route", "status", "engine"], registry=r)
        self.latency = Histogram("flm_request_duration_seconds", "Total request latency",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("flm_overhead_seconds",
                                  "Time spent in FLM itself (total minus engine time)",
                                  ["route"], buckets=_OVERHEAD_BUCKETS, registry=r)
        self.ttft = Histogram("flm_time_to_first_token_seconds",
                              "Time from request to the first streamed chunk", ["engine"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("flm_tokens_total", "Tokens reported by engines",
                              ["engine", "direction"], registry=r)
        self.active_streams = Gauge("flm_active_streams", "Streams in flight", registry=r)
        self.engine_up = Gauge("flm_engine_healthy", "1 when the engine is usable", ["engine"],
                               registry=r)
        self.auth_failures = Counter("flm_auth_failures_total", "Rejected credentials",
                                     registry=r)
        self.blocks = Counter("flm_blocked_requests_total", "Requests refused by IP blocks",
                              ["reason"], registry=r)
        self.rate_limited = Counter("flm_rate_limited_total", "Requests refused by rate limits",
                                    ["scope"], registry=r)

    def record_request(self, route: str, status: int, engine: str, elapsed: float,
                       overhead: float | None) -> None:
        """The per-request metrics, with the labelled children cached (label lookups take a
        lock each; the set of routes, statuses and engines is small)."""
        key = (route, status, engine)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(route, str(status), engine),
                        self.latency.labels(route), self.overhead.labels(route))
            if len(self._children) < 10_000:
                self._children[key] = children
        children[0].inc()
        children[1].observe(elapsed)
        if overhead is not None:
            children[2].observe(max(overhead, 0.0))

    def _per_engine(self, engine: str) -> tuple[Any, Any, Any]:
        child = self._engine_children.get(engine)
        if child is None:
            child = self._engine_children.setdefault(engine, (
                self.ttft.labels(engine), self.tokens.labels(engine, "in"),
                self.tokens.labels(engine, "out")))
        return child

    def record_ttft(self, engine: str, seconds: float) -> None:
        self._per_engine(engine)[0].observe(seconds)

    def record_tokens(self, engine: str, prompt: int | None, completion: int | None) -> None:
        child = self._per_engine(engine)
        if prompt:
            child[1].inc(prompt)
        if completion:
            child[2].inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
