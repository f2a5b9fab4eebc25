"""What an ACME issuance is asked to do: which CA directory to talk to (and which CA bundle to
trust for it), which challenge type proves control, and the names a certificate is for."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flm.core.errors import ProxyAcmeError, ProxyCertError
from flm.tls.certs import normalize_host

LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
LETSENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class AcmeDirectory:
    """Which ACME CA to talk to, and which CA bundle to trust when doing so."""

    url: str
    ca_bundle: Path | None = None
    #: ``env`` (FLM_ACME_DIRECTORY), ``production`` (FLM_ACME_USE_PROD) or ``staging``.
    source: str = "staging"

    @property
    def is_letsencrypt_production(self) -> bool:
        return self.url == LETSENCRYPT_PRODUCTION


def resolve_acme_directory(env: Mapping[str, str]) -> AcmeDirectory:
    """``FLM_ACME_DIRECTORY`` wins, then ``FLM_ACME_USE_PROD=true``; else Let's Encrypt staging.

    ``FLM_ACME_CA_BUNDLE`` names a PEM bundle to trust for the directory's HTTPS (a private CA such
    as step-ca, or Pebble in tests).
    """
    bundle_text = (env.get("FLM_ACME_CA_BUNDLE") or "").strip()
    bundle = Path(bundle_text).expanduser() if bundle_text else None
    if bundle is not None and not bundle.is_file():
        raise ProxyAcmeError(f"FLM_ACME_CA_BUNDLE points to {bundle}, which is not a file")
    url = (env.get("FLM_ACME_DIRECTORY") or "").strip()
    if url:
        if not url.lower().startswith("https://"):
            raise ProxyAcmeError(f"FLM_ACME_DIRECTORY must be an https:// URL, got {url!r}")
        return AcmeDirectory(url, bundle, "env")
    if (env.get("FLM_ACME_USE_PROD") or "").strip().lower() in _TRUE:
        return AcmeDirectory(LETSENCRYPT_PRODUCTION, bundle, "production")
    return AcmeDirectory(LETSENCRYPT_STAGING, bundle, "staging")


CHALLENGES = ("http-01", "dns-01")


def check_challenge_type(challenge: str) -> str:
    """``http-01`` or ``dns-01``; anything else is unknown."""
    value = challenge.strip().lower()
    if value in CHALLENGES:
        return value
    raise ProxyAcmeError(
        f"unknown ACME challenge type {challenge!r}; supported: {', '.join(CHALLENGES)}"
    )


def check_acme_names(domains: Sequence[str] | str, *, wildcard_ok: bool) -> list[str]:
    """Normalised, de-duplicated names for one certificate, in the order given (the first one
    names the certificate). ``*.name`` only with ``wildcard_ok`` (DNS-01)."""
    items = [domains] if isinstance(domains, str) else list(domains)
    if not items:
        raise ProxyAcmeError("--acme-domain is required")
    names: list[str] = []
    for item in items:
        text = item.strip()
        if text.startswith("*."):
            if not wildcard_ok:
                raise ProxyAcmeError(
                    f"--acme-domain {text}: wildcard certificates need --challenge dns-01 "
                    "(HTTP-01 cannot prove control of every name under a domain)"
                )
            name = "*." + check_acme_domain(text[2:])
        else:
            name = check_acme_domain(text)
        if name not in names:
            names.append(name)
    return names


def check_acme_domain(domain: str) -> str:
    """One normalised DNS name (no wildcard, no IP address)."""
    try:
        name = normalize_host(domain)
    except ProxyCertError as exc:
        raise ProxyAcmeError(f"--acme-domain: {exc.message}") from exc
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise ProxyAcmeError(f"--acme-domain must be a DNS name, not an IP address: {domain!r}")
