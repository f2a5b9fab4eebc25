"""Settings (``flm config``): a small registry of known keys with types and defaults."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flm.core.errors import ConfigNotSetError, UsageError
from flm.storage import Storage
from flm.storage.config_db import SettingsRepo

T = TypeVar("T", int, float)


def _in_range(convert: Callable[[str], T], noun: str, lo: T, hi: T) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise UsageError(f"expected {noun}, got {text!r}") from None
        if not lo <= value <= hi:
            raise UsageError(f"expected {noun} between {lo} and {hi}, got {value}")
        return value

    return parse


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    return _in_range(int, "an integer", lo, hi)


def _float_in(lo: float, hi: float) -> Callable[[str], float]:
    return _in_range(float, "a number", lo, hi)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise UsageError(f"expected one of {', '.join(options)}, got {text!r}")
        return text

    return parse


def _bind_address(text: str) -> str:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"expected an IP address to bind to, got {text!r}") from None
    return text


@dataclass(frozen=True)
class KnownSetting:
    default: Any
    parse: Callable[[str], Any]
    help: str


KNOWN: dict[str, KnownSetting] = {
    "proxy.port": KnownSetting(8080, _int_in(1, 65535), "default proxy port"),
    "proxy.bind": KnownSetting("127.0.0.1", _bind_address, "default bind address"),
    "proxy.max_body_bytes": KnownSetting(
        32 * 1024 * 1024, _int_in(1024, 1024**3), "request body limit in bytes"
    ),
    "engine.health_latency_threshold_ms": KnownSetting(
        1500, _int_in(1, 600_000), "health latency above this = RunningDegraded"
    ),
    "engine.max_network_failures": KnownSetting(
        3, _int_in(1, 100), "consecutive connect failures before ErrorNetwork"
    ),
    "engine.connect_timeout_s": KnownSetting(5.0, _float_in(0.1, 300), "upstream connect timeout"),
    "engine.first_byte_timeout_s": KnownSetting(
        60.0, _float_in(0.1, 3600), "upstream time-to-first-byte limit"
    ),
    "engine.idle_timeout_s": KnownSetting(
        60.0, _float_in(0.1, 3600), "upstream idle limit between stream chunks"
    ),
    "pool.backoff_initial_s": KnownSetting(
        1.0, _float_in(0.01, 3600), "first wait before a failed pool member is probed"
    ),
    "pool.backoff_max_s": KnownSetting(
        30.0, _float_in(0.01, 3600), "longest wait between probes of a failed pool member"
    ),
    "responses.retention_s": KnownSetting(
        86400, _int_in(1, 30 * 86400), "stored Responses API responses are kept this long"
    ),
    "responses.max_per_key": KnownSetting(
        1000, _int_in(1, 100_000), "stored Responses API responses kept per API key"
    ),
    "audit.retention_days": KnownSetting(7, _int_in(1, 3650), "audit rows older are archived"),
    "preferred_language": KnownSetting("en", _choice("en", "ja"), "web UI language"),
    "ui.theme": KnownSetting(
        "system", _choice("system", "light", "dark"), "web UI theme (system follows the OS)"
    ),
    "log.level": KnownSetting(
        None,
        _choice("debug", "info", "warning", "error", "critical"),
        "log level of the daemon and running proxies, applied on reload",
    ),
}

_KEY = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


class ConfigService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    @property
    def _repo(self) -> SettingsRepo:
        return SettingsRepo(self._storage.config)

    @staticmethod
    def _known(key: str) -> KnownSetting:
        if not _KEY.match(key) or key not in KNOWN:
            raise UsageError(f"unknown setting {key!r}; known settings: {', '.join(sorted(KNOWN))}")
        return KNOWN[key]

    def get(self, key: str) -> dict[str, Any]:
        known = self._known(key)
        stored = self._repo.get(key)
        if stored is not None:
            return {
                "key": key,
                "value": known.parse(stored.value),
                "source": "stored",
                "updated_at": stored.updated_at,
            }
        if known.default is None:
            raise ConfigNotSetError(f"{key} is not set")
        return {"key": key, "value": known.default, "source": "default", "updated_at": None}

    def value(self, key: str) -> Any:
        return self.get(key)["value"]

    def set(self, key: str, text: str) -> dict[str, Any]:
        known = self._known(key)
        try:
            value = known.parse(text)
        except UsageError as exc:
            raise UsageError(f"{key}: {exc.message}") from None
        stored = self._repo.set(key, str(value))
        return {"key": key, "value": value, "source": "stored", "updated_at": stored.updated_at}

    def list(self) -> list[dict[str, Any]]:
        stored = {s.key: s for s in self._repo.all()}
        out: list[dict[str, Any]] = []
        for key in sorted(KNOWN):
            known = KNOWN[key]
            if key in stored:
                out.append(
                    {
                        "key": key,
                        "value": known.parse(stored[key].value),
                        "source": "stored",
                        "updated_at": stored[key].updated_at,
                    }
                )
            else:
                out.append(
                    {"key": key, "value": known.default, "source": "default", "updated_at": None}
                )
        return out
