"""Certificates for the proxy's TLS modes (SPEC §6): issue or reuse, ACME with its fallback chain,
and the ``certificates`` table.

- ``dev-selfsigned`` / ``packaged-ca``: :meth:`CertificateService.local` issues or reuses the
  root and server certificate under ``certs/<mode>/`` (see :mod:`flm.tls.issue`).
- ``https-acme``: :meth:`CertificateService.acme_at_start` reuses a stored certificate that is
  not due for renewal (and names every requested name); otherwise it asks the ACME CA (HTTP-01,
  or DNS-01 through a ``flm secrets dns`` profile) and, when that fails, falls back
  to a still-valid stored certificate, and only then fails with ``PROXY_ACME_ERROR`` naming the
  ``dev-selfsigned`` fallback and the manual steps.

Every certificate put into service is recorded in ``security.db``'s ``certificates`` table (one
row per mode, and per domain for ACME). Everything here blocks (file I/O, key generation, the
ACME protocol): call it from a worker thread when an event loop is running.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flm.core.errors import ProxyAcmeError, ProxyError
from flm.core.paths import ensure_private_dir
from flm.services.proxy_config import DEV_MODE, LOCAL_CA_MODE
from flm.storage import Storage
from flm.storage.records import CertificatesRepo
from flm.tls.certs import CertBundle, load_cert_file, needs_renewal

if TYPE_CHECKING:
    from flm.egress.config import EgressConfig
    from flm.tls.acme_options import AcmeDirectory

LOCAL_MODES = (DEV_MODE, LOCAL_CA_MODE)
#: Certificates are renewed this many days before they end (SPEC §6).
RENEW_BEFORE_DAYS = 30.0


@dataclass(frozen=True)
class AcmeSettings:
    """What an ``https-acme`` proxy needs to obtain its certificate."""

    domain: str
    email: str
    directory: AcmeDirectory
    timeout_s: float = 90.0
    #: Every name of the certificate, ``domain`` first (``*.example.org`` with DNS-01).
    names: tuple[str, ...] = ()
    challenge: str = "http-01"
    #: ``flm secrets dns`` profile (DNS-01 only).
    dns_profile: str | None = None

    @property
    def all_names(self) -> tuple[str, ...]:
        return self.names or (self.domain,)


@dataclass(frozen=True)
class AcmeOutcome:
    """The certificate an ``https-acme`` proxy starts with, and how it got it.

    ``source``: ``issued`` (obtained now), ``stored`` (reused, not yet due for renewal) or
    ``stored-fallback`` (renewal failed; the stored certificate is still valid). ``error`` is the
    ACME failure behind a fallback.
    """

    bundle: CertBundle
    source: str
    error: str | None = None


def resolve_acme_settings(
    domain: str | Sequence[str],
    email: str,
    env: Mapping[str, str],
    timeout_s: float = 90.0,
    *,
    challenge: str = "http-01",
    dns_profile: str | None = None,
) -> AcmeSettings:
    """Validate the names and the ``FLM_ACME_*`` settings (no network)."""
    from flm.tls.acme_options import check_acme_names, resolve_acme_directory

    names = check_acme_names(domain, wildcard_ok=challenge == "dns-01")
    if "@" not in email or email.startswith("@") or email.endswith("@"):
        raise ProxyError(f"--acme-email must be an e-mail address, got {email!r}")
    if challenge == "dns-01" and not dns_profile:
        raise ProxyError(
            "--challenge dns-01 needs --dns-profile NAME (create one with "
            "`flm secrets dns add NAME ...`)"
        )
    return AcmeSettings(
        names[0],
        email.strip(),
        resolve_acme_directory(env),
        timeout_s,
        tuple(names),
        challenge,
        dns_profile if challenge == "dns-01" else None,
    )


class CertificateService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.certs_dir: Path = ensure_private_dir(storage.paths.certs_dir)

    # --- the local modes -------------------------------------------------------------------------

    def local(self, mode: str, *, now: datetime | None = None) -> CertBundle:
        """The ``dev-selfsigned`` or ``packaged-ca`` server certificate, issued or reused."""
        from flm.tls.issue import (
            default_server_hosts,
            ensure_dev_selfsigned,
            ensure_local_ca,
            ensure_server_cert,
        )

        if mode == DEV_MODE:
            bundle = ensure_dev_selfsigned(self.certs_dir, now=now)
        elif mode == LOCAL_CA_MODE:
            ca = ensure_local_ca(self.certs_dir, now=now)
            bundle = ensure_server_cert(ca, self.certs_dir, default_server_hosts(), now=now)
        else:
            raise ProxyError(f"{mode!r} is not a local certificate mode")
        self.record(bundle)
        return bundle

    # --- ACME ------------------------------------------------------------------------------------

    def live_dir(self, domain: str) -> Path:
        from flm.tls.acme_store import acme_live_dir

        return acme_live_dir(self.certs_dir, domain)

    def account_key_path(self, directory_url: str) -> Path:
        """One ACME account key per directory (an account belongs to one CA)."""
        digest = hashlib.sha256(directory_url.encode()).hexdigest()[:16]
        return ensure_private_dir(self.certs_dir / "acme-accounts") / f"{digest}.pem"

    def stored_acme(self, domain: str, names: Sequence[str] = ()) -> CertBundle | None:
        """The stored certificate for ``domain`` if it is readable, not expired and names all
        of ``names``."""
        from flm.tls.acme_store import load_acme_certificate

        return load_acme_certificate(self.certs_dir, domain, names=names)

    def check_dns_profile(self, settings: AcmeSettings) -> None:
        """DNS-01: the profile exists and its secret can be read (no network)."""
        if settings.challenge != "dns-01" or settings.dns_profile is None:
            return
        from flm.services.dns_secrets import DnsSecretsService

        secrets = DnsSecretsService(self._storage)
        secrets.secret(secrets.get(settings.dns_profile))

    def obtain_acme(
        self,
        settings: AcmeSettings,
        challenges: MutableMapping[str, str],
        egress: EgressConfig | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> CertBundle:
        """One issuance (HTTP-01, or DNS-01 through the settings' DNS profile); the certificate
        is stored and recorded. ``ProxyAcmeError`` (DNS-01: one of its named subclasses).

        ``egress``: the egress in force; the ACME CA is reached through it unless it is on
        this machine. ``progress`` hears what DNS-01 is waiting for.
        """
        from flm.tls.acme_client import AcmeClient
        from flm.tls.acme_store import ACME_LIVE_DIR, store_acme_certificate

        hook = None
        if egress is not None and egress.uses_proxy:
            from flm.egress.sync import mount_egress

            url = settings.directory.url

            def hook(session: Any) -> None:
                mount_egress(session, egress, url)

        ensure_private_dir(self.certs_dir / ACME_LIVE_DIR)  # 0700, like certs/<domain>/ in it
        solver = None
        timeout_s = settings.timeout_s
        if settings.challenge == "dns-01":
            from flm.services.dns_secrets import DnsSecretsService
            from flm.tls.dns01 import Dns01Solver, provider_for

            assert settings.dns_profile is not None
            secrets = DnsSecretsService(self._storage)
            profile = secrets.get(settings.dns_profile)
            provider = provider_for(profile, secrets.secret(profile))
            solver = Dns01Solver(provider, profile.propagation_timeout_s, progress)
            timeout_s += profile.propagation_timeout_s
        client = AcmeClient(
            settings.directory.url,
            settings.email,
            self.account_key_path(settings.directory.url),
            ca_bundle=settings.directory.ca_bundle,
            timeout_s=timeout_s,
            session_hook=hook,
        )
        if solver is not None:
            try:
                chain, key = client.obtain_dns(settings.all_names, solver)
            finally:
                solver.provider.close()
        else:
            chain, key = client.obtain(settings.domain, challenges)
        bundle = store_acme_certificate(
            self.certs_dir, settings.domain, chain, key, settings.all_names
        )
        self.record(bundle)
        return bundle

    def acme_at_start(
        self,
        settings: AcmeSettings,
        challenges: MutableMapping[str, str],
        *,
        port: int,
        renew_before_days: float = RENEW_BEFORE_DAYS,
        egress: EgressConfig | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> AcmeOutcome:
        """The fallback chain of SPEC §6 (see the module docstring)."""
        stored = self.stored_acme(settings.domain, settings.all_names)
        if stored is not None and not due_for_renewal(stored, renew_before_days):
            self.record(stored)
            return AcmeOutcome(stored, "stored")
        try:
            return AcmeOutcome(self.obtain_acme(settings, challenges, egress, progress), "issued")
        except ProxyAcmeError as exc:
            if stored is not None:
                self.record(stored)
                return AcmeOutcome(stored, "stored-fallback", exc.message)
            raise self.no_fallback_error(settings, exc, port) from exc

    def no_fallback_error(
        self, settings: AcmeSettings, exc: ProxyAcmeError, port: int
    ) -> ProxyAcmeError:
        live = self.live_dir(settings.domain)
        dev = f"flm proxy start --mode dev-selfsigned --port {port}"
        names = " ".join(f"-d '{n}'" for n in settings.all_names)
        by_hand = (
            f"certbot certonly --manual --preferred-challenges dns {names}"
            if settings.challenge == "dns-01"
            else f"certbot certonly --standalone {names}"
        )
        steps = [
            "fix the cause above and run the same start again (FLM retries the ACME order), or",
            f"serve HTTPS now with FLM's own certificate: `{dev}` (clients must trust FLM's "
            "root: `flm security install-ca --cert-path "
            f"{self.certs_dir / DEV_MODE / 'ca.pem'}`), or",
            f"obtain a certificate for {settings.domain} by hand (e.g. `{by_hand}`), copy it "
            f"to {live / 'fullchain.pem'} and its "
            f"key to {live / 'privkey.pem'} (mode 0600), then start again: FLM serves a valid "
            "stored certificate when the ACME CA cannot be reached",
        ]
        return ProxyAcmeError(
            f"could not obtain a certificate for {settings.domain} from "
            f"{settings.directory.url}: {exc.message.rstrip('.')}. There is no stored "
            "certificate to fall "
            "back on. What you can do: " + " ".join(f"({i}) {s}" for i, s in enumerate(steps, 1)),
            code=exc.code,
            details={
                "domain": settings.domain,
                "directory": settings.directory.url,
                "acme_error": exc.message,
                "error_code": exc.code,
                "fallback": {"mode": DEV_MODE, "command": dev},
                "manual_steps": steps,
                "live_dir": str(live),
            },
        )

    # --- the certificates table ------------------------------------------------------------------

    def record(self, bundle: CertBundle) -> None:
        """Upsert ``bundle``'s row in ``certificates``."""
        CertificatesRepo(self._storage.security).upsert(bundle.to_record())

    def records(self) -> list[dict[str, Any]]:
        return CertificatesRepo(self._storage.security).all()


def due_for_renewal(
    bundle: CertBundle, days: float = RENEW_BEFORE_DAYS, now: datetime | None = None
) -> bool:
    """True when ``bundle``'s leaf ends within ``days`` (or cannot be read any more)."""
    try:
        leaf = load_cert_file(bundle.cert_path)[0]
    except ProxyError:
        return True
    return needs_renewal(leaf, now, days)


def trust_hints(bundle: CertBundle, https_port: int) -> dict[str, str] | None:
    """How to trust (and later remove) FLM's own root, for the local modes."""
    if bundle.ca_path is None:
        return None
    cert = str(bundle.ca_path)
    return {
        "root_ca": cert,
        "fingerprint_sha256_root": _root_fingerprint(bundle.ca_path),
        "trust": f"flm security install-ca --cert-path {cert}",
        "untrust": f"flm security uninstall-ca --cert-path {cert}",
        "curl": f"curl --cacert {cert} https://localhost:{https_port}/v1/models",
    }


def _root_fingerprint(path: Path) -> str:
    from flm.tls.certs import fingerprint_sha256

    try:
        return fingerprint_sha256(load_cert_file(path)[0])
    except ProxyError:
        return ""
