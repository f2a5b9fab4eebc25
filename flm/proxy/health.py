"""Engine health in the background: the ``flm_engine_healthy`` gauge and ``engine_down`` /
``engine_up`` security events (which the alerter sends), never on the request path.

Every ``interval`` seconds each registered engine gets one health probe (bounded by a timeout);
a transition from usable to not (or back) is recorded once, not on every probe. The watch runs
only while someone listens (alerts configured, or ``/metrics`` scraped), so a proxy nobody
monitors sends engines nothing but its clients' requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from flm.core.errors import EngineError
from flm.proxy.runtime import ProxyRuntime

log = logging.getLogger("flm.proxy.health")

INTERVAL_S = 15.0
PROBE_TIMEOUT_S = 5.0


async def probe_all(rt: ProxyRuntime, previous: dict[str, bool]) -> dict[str, bool]:
    ids = rt.engines.ids()

    async def one(engine_id: str) -> bool:
        try:
            adapter = rt.engines.adapter(engine_id)
            health = await asyncio.wait_for(
                adapter.health_check(PROBE_TIMEOUT_S), PROBE_TIMEOUT_S + 1
            )
        except (EngineError, TimeoutError, OSError):
            return False
        except Exception:  # an adapter bug must not stop the watch
            log.exception("health probe of %s failed", engine_id)
            return False
        return health.degraded_reason is None

    results = dict(zip(ids, await asyncio.gather(*(one(i) for i in ids)), strict=True))
    for engine_id, healthy in results.items():
        rt.metrics.engine_up.labels(engine_id).set(1 if healthy else 0)
        before = previous.get(engine_id)
        if before is not None and before != healthy and rt.audit is not None:
            if healthy:
                rt.audit.event("engine_up", "info", "", {"engine_id": engine_id})
            else:
                rt.audit.event("engine_down", "high", "", {"engine_id": engine_id})
    for gone in set(previous) - set(results):
        with contextlib.suppress(KeyError):
            rt.metrics.engine_up.remove(gone)
    return results


async def watch_engines(rt: ProxyRuntime, interval: float = INTERVAL_S) -> None:
    state: dict[str, bool] = {}
    while True:
        try:
            state = await probe_all(rt, state)
        except Exception:
            log.exception("engine health watch failed")
        await asyncio.sleep(interval)


def watch_if_alerting(rt: ProxyRuntime) -> None:
    """Engines are probed in the background only when someone listens: alerts are configured
    (here, at start and on reload) or ``/metrics`` is scraped (the route starts it)."""
    if rt.alerts is not None and rt.alerts.settings is not None:
        ensure_engine_watch(rt)


def ensure_engine_watch(rt: ProxyRuntime) -> None:
    """Start the watch once per runtime (cancelled with the runtime's other tasks)."""
    if getattr(rt, "_engine_watch", None) is None:
        task = asyncio.ensure_future(watch_engines(rt))
        rt._engine_watch = task  # type: ignore[attr-defined]
        rt.tasks.append(task)
