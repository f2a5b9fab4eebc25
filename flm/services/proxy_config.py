"""``flm proxy start`` options, validated once (SPEC §6, §7, §8).

Light on purpose (no aiohttp, no cryptography): the CLI validates with it before it talks to the
daemon, and the daemon validates again what it receives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flm.core.errors import ProxyAcmeError, ProxyError
from flm.egress.config import EgressConfig
from flm.state.config import StateBackendConfig

LOCAL_HTTP = "local-http"
DEV_MODE = "dev-selfsigned"
LOCAL_CA_MODE = "packaged-ca"
ACME_MODE = "https-acme"
TLS_MODES = (DEV_MODE, LOCAL_CA_MODE, ACME_MODE)
MODES = (LOCAL_HTTP, *TLS_MODES)
#: The environment variables that choose the ACME CA; the CLI passes its own values along.
ACME_ENV_KEYS = ("FLM_ACME_DIRECTORY", "FLM_ACME_USE_PROD", "FLM_ACME_CA_BUNDLE")


@dataclass(frozen=True)
class StartConfig:
    mode: str = LOCAL_HTTP
    port: int = 8080
    bind: str = "127.0.0.1"
    egress: EgressConfig = field(default_factory=EgressConfig)
    acme_domain: str | None = None
    acme_email: str | None = None
    challenge: str = "http-01"
    #: ``FLM_ACME_*`` as the user's shell had them (``None``: this process's environment).
    acme_env: dict[str, str] | None = None
    #: Every ``--acme-domain`` (one certificate names them all); ``acme_domain`` is the first.
    acme_domains: tuple[str, ...] = ()
    #: ``--dns-profile`` (``--challenge dns-01``).
    dns_profile: str | None = None
    #: ``--workers``: gateway processes sharing the port(s) (SO_REUSEPORT); 1 is one process.
    workers: int = 1
    #: ``--state-backend`` and its options (None: this process's own state).
    state: StateBackendConfig | None = None

    @property
    def tls(self) -> bool:
        return self.mode in TLS_MODES

    @property
    def https_port(self) -> int | None:
        """HTTPS listens on ``port + 1`` in every TLS mode."""
        return self.port + 1 if self.tls else None

    @property
    def env(self) -> Mapping[str, str]:
        return self.acme_env if self.acme_env is not None else os.environ

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StartConfig:
        """Validate what ``proxy start`` sends; ``ProxyError`` (``PROXY_INVALID_CONFIG``) or, for
        an unknown ``--challenge``, ``ProxyAcmeError``."""
        mode = str(data.get("mode") or LOCAL_HTTP)
        if mode not in MODES:
            raise ProxyError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        try:
            port = int(data.get("port") or 8080)
        except (TypeError, ValueError):
            raise ProxyError(f"port must be a number, got {data.get('port')!r}") from None
        top = 65534 if mode in TLS_MODES else 65535
        if not 0 < port <= top:
            raise ProxyError(
                f"--port must be 1-{top} (HTTPS listens on port+1), got {port}"
                if mode in TLS_MODES
                else f"--port must be 1-65535, got {port}"
            )
        bind = str(data.get("bind") or "127.0.0.1")
        egress = EgressConfig.from_options(
            _opt(data, "egress_mode"),
            _opt(data, "socks5_endpoint"),
            bool(data.get("egress_fail_open")),
        )
        raw_domains = data.get("acme_domain")
        if isinstance(raw_domains, list | tuple):
            domains = tuple(t for t in (str(d).strip() for d in raw_domains if d) if t)
        else:
            one = _opt(data, "acme_domain")
            domains = (one,) if one else ()
        domain = domains[0] if domains else None
        email = _opt(data, "acme_email")
        dns_profile = _opt(data, "dns_profile")
        challenge = (_opt(data, "challenge") or "http-01").lower()
        raw_env = data.get("acme_env")
        acme_env = (
            {str(k): str(v) for k, v in raw_env.items() if k in ACME_ENV_KEYS}
            if isinstance(raw_env, Mapping)
            else None
        )
        if mode == ACME_MODE:
            from flm.tls.acme_options import check_challenge_type

            challenge = check_challenge_type(challenge)
            missing = [
                flag
                for flag, value in (("--acme-domain", domain), ("--acme-email", email))
                if not value
            ]
            if missing:
                what = (
                    "the DNS name(s) of the certificate"
                    if challenge == "dns-01"
                    else "the public DNS name whose port 80 reaches FLM"
                )
                raise ProxyError(
                    f"--mode https-acme needs {' and '.join(missing)} ({what}, "
                    "and the contact address for the ACME account)"
                )
            if challenge == "dns-01" and not dns_profile:
                raise ProxyError(
                    "--challenge dns-01 needs --dns-profile NAME (the DNS "
                    "credentials to publish the TXT records with; create them "
                    "with `flm secrets dns add NAME ...`)"
                )
            if challenge != "dns-01" and dns_profile:
                raise ProxyError("--dns-profile only applies to --challenge dns-01")
            wild = [d for d in domains if d.startswith("*")]
            if wild and challenge != "dns-01":
                raise ProxyAcmeError(
                    f"--acme-domain {wild[0]}: wildcard certificates need "
                    "--challenge dns-01 --dns-profile NAME"
                )
        else:
            given = [
                flag
                for flag, value in (
                    ("--acme-domain", domain),
                    ("--acme-email", email),
                    ("--dns-profile", dns_profile),
                )
                if value
            ]
            if challenge != "http-01":
                given.append("--challenge")
            if given:
                raise ProxyError(f"{', '.join(given)} only apply to --mode https-acme")
        workers = _workers(data)
        state = StateBackendConfig.from_options(
            _opt(data, "state_backend"),
            _opt(data, "state_password_file"),
            bool(data.get("state_fail_open")),
            _opt(data, "state_ca_file"),
        )
        return cls(
            mode,
            port,
            bind,
            egress,
            domain,
            email,
            challenge,
            acme_env,
            domains,
            dns_profile,
            workers=workers,
            state=state,
        )


#: The most ``--workers`` one proxy may have (a typo like 100 should not fork 100 gateways).
MAX_WORKERS = 64


def _workers(data: Mapping[str, Any]) -> int:
    """``--workers``, checked: 1..MAX_WORKERS; above 1 it needs Linux (``SO_REUSEPORT``) and a
    ``--state-backend``, without which every process would keep its own rate-limit buckets,
    failure counts and revocations (limits would multiply by the number of workers)."""
    raw = data.get("workers")
    try:
        workers = 1 if raw is None else int(raw)
    except (TypeError, ValueError):
        raise ProxyError(f"--workers must be a number, got {raw!r}") from None
    if not 1 <= workers <= MAX_WORKERS:
        raise ProxyError(f"--workers must be 1-{MAX_WORKERS}, got {workers}")
    if workers > 1:
        from flm.http.server import reuse_port_supported

        if not reuse_port_supported():
            raise ProxyError(
                "--workers above 1 needs Linux: the workers share the port with SO_REUSEPORT, "
                "which this platform does not spread across processes"
            )
        if not _opt(data, "state_backend"):
            raise ProxyError(
                f"--workers {workers} needs --state-backend redis://HOST:PORT/DB: without "
                "shared state each worker would keep its own rate limits, failure counts and "
                "revocations, so limits would multiply by the number of workers"
            )
    return workers


def _opt(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def acme_env_from(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``FLM_ACME_*`` settings to send to the daemon (a CA bundle path made absolute)."""
    env = {k: environ[k] for k in ACME_ENV_KEYS if environ.get(k)}
    bundle = env.get("FLM_ACME_CA_BUNDLE")
    if bundle:
        env["FLM_ACME_CA_BUNDLE"] = str(Path(bundle).expanduser().absolute())
    return env
