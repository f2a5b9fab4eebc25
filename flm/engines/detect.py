"""Detection: binary lookup + API ping + health latency → an ``EngineStatus`` (SPEC §3.2)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flm.core.errors import EngineError, EngineNetworkError, EngineTimeoutError
from flm.core.models import EngineEndpoint, EngineState, EngineStatus
from flm.engines import kinds
from flm.engines.base import EngineAdapter
from flm.engines.kinds import KindDescriptor, make_adapter
from flm.http.client import FlmListenerError, Timeouts

#: Where installers put engine executables besides PATH.
_KNOWN_DIRS = (
    "/usr/local/bin",
    "/usr/bin",
    "/opt/homebrew/bin",
    "~/.local/bin",
    "~/.lmstudio/bin",
    "~/.cache/lm-studio/bin",
)


@dataclass(frozen=True)
class DetectSettings:
    threshold_ms: float = 1500
    max_failures: int = 3
    retry_delay_s: float = 0.05

    @property
    def probe_timeout_s(self) -> float:
        """Long enough to see a slow engine as slow, short enough to keep detection quick."""
        return min(max(self.threshold_ms / 1000 * 2, 1.0), 5.0)


def find_binary(kind: KindDescriptor, env: Mapping[str, str] | None = None) -> str | None:
    """The kind's executable (its ``binary_env`` variable first, then PATH and the usual
    install folders), if installed."""
    env = os.environ if env is None else env
    override = env.get(kind.binary_env, "") if kind.binary_env else ""
    if override and Path(override).is_file():
        return override
    dirs = [str(Path(sys.executable).parent), *(os.path.expanduser(d) for d in _KNOWN_DIRS)]
    for name in kind.binaries:
        found = shutil.which(name, path=env.get("PATH"))
        if found:
            return found
        for folder in dirs:
            candidate = Path(folder) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def _upstream_status(exc: EngineError) -> int | None:
    details = exc.details
    if isinstance(details, dict):
        value = details.get("upstream_status")
        return int(value) if isinstance(value, int) else None
    return None


async def probe(
    adapter: EngineAdapter, settings: DetectSettings, binary: str | None
) -> EngineState | None:
    """One engine's state, or ``None`` when the endpoint turns out to be FLM itself."""
    endpoint = adapter.endpoint
    state = EngineState(
        endpoint.id,
        endpoint.kind,
        endpoint.base_url,
        EngineStatus.ERROR_NETWORK,
        source=endpoint.source,
        binary_path=binary,
        checked_at=time.time(),
        capabilities=adapter.capabilities(),
    )
    failures = 0
    while True:
        try:
            health = await adapter.health_check(settings.probe_timeout_s)
        except FlmListenerError:
            return None
        except EngineTimeoutError as exc:
            # A timeout already waited the whole probe budget: it counts as the last failure.
            state.error = exc.message
            break
        except EngineNetworkError as exc:
            status = _upstream_status(exc)
            if status in (429, 503):
                state.status = EngineStatus.RUNNING_DEGRADED
                state.error = exc.message
                return state
            failures += 1
            state.error = exc.message
            if failures >= settings.max_failures:
                break
            await asyncio.sleep(settings.retry_delay_s * failures)
            continue
        except EngineError as exc:
            state.status = EngineStatus.ERROR_API
            state.error = exc.message
            return state
        state.latency_ms = round(health.latency_ms, 2)
        state.version = health.version
        if health.degraded_reason:
            state.status = EngineStatus.RUNNING_DEGRADED
            state.error = health.degraded_reason
        elif health.latency_ms >= settings.threshold_ms:
            state.status = EngineStatus.RUNNING_DEGRADED
            state.error = (
                f"slow: health answered in {health.latency_ms:.0f} ms "
                f"(threshold {settings.threshold_ms:.0f} ms)"
            )
        else:
            state.status = EngineStatus.RUNNING_HEALTHY
        return state
    state.status = EngineStatus.INSTALLED_ONLY if binary else EngineStatus.ERROR_NETWORK
    return state


async def detect_all(
    endpoints: Sequence[EngineEndpoint],
    settings: DetectSettings,
    timeouts: Timeouts | None = None,
    env: Mapping[str, str] | None = None,
) -> list[EngineState | None]:
    """Probe every endpoint concurrently; results in the same order."""
    adapters = [make_adapter(e, timeouts) for e in endpoints]
    try:
        return list(
            await asyncio.gather(
                *(
                    probe(a, settings, find_binary(kinds.get(a.endpoint.kind), env))
                    for a in adapters
                )
            )
        )
    finally:
        await asyncio.gather(*(a.close() for a in adapters), return_exceptions=True)
