"""Everything one running proxy needs, built once and swapped on reload."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from flm.core.models import EngineEndpoint
from flm.engines.http import Timeouts
from flm.proxy.engines import EngineRegistry
from flm.proxy.keys import KeyVerifier
from flm.proxy.metrics import Metrics


@dataclass(frozen=True)
class ProxySettings:
    port: int = 8080
    bind: str = "127.0.0.1"
    mode: str = "local-http"
    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout_s: float = 30.0
    handle_id: str = "proxy"
    https_port: int | None = None

    @property
    def loopback_only(self) -> bool:
        try:
            return ipaddress.ip_address(self.bind).is_loopback
        except ValueError:
            return self.bind == "localhost"


@dataclass
class ProxyRuntime:
    settings: ProxySettings
    engines: EngineRegistry
    keys: KeyVerifier
    metrics: Metrics = field(default_factory=Metrics)
    policy: dict[str, Any] = field(default_factory=dict)

    async def close(self) -> None:
        await self.engines.close()


def _is_self(endpoint: EngineEndpoint, settings: ProxySettings) -> bool:
    """An endpoint that is this proxy's own listener (llama.cpp and FLM share port 8080)."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint.base_url)
    if parts.port not in (settings.port, settings.https_port):
        return False
    host = parts.hostname or ""
    if host in ("localhost", settings.bind) or settings.bind in ("0.0.0.0", "::"):  # noqa: S104
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_runtime(settings: ProxySettings, ctx: Any) -> ProxyRuntime:
    """Build a runtime from a ``flm.services.context.Context``."""
    from flm.services.keys import verify_key_hash
    from flm.storage.security import ApiKeysRepo

    endpoints = [e for e in ctx.engines.endpoints() if not _is_self(e, settings)]
    timeouts: Timeouts = ctx.engines.timeouts()
    keys_repo = ApiKeysRepo(ctx.storage.security)
    runtime = ProxyRuntime(
        settings=settings,
        engines=EngineRegistry(endpoints, timeouts),
        keys=KeyVerifier(keys_repo.hash_of, verify_key_hash),
        policy=json.loads(json.dumps(ctx.policy.show()["policy"])),
    )
    return runtime
