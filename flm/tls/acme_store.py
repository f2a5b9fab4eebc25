"""Issued ACME certificates on disk: ``certs/acme-live/<first name>/{fullchain,privkey}.pem``,
checked before they are saved and before they are reused."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from flm.core.errors import ProxyAcmeError, ProxyCertError
from flm.tls._fs import dir_lock
from flm.tls.acme_options import check_acme_names
from flm.tls.certs import (
    CertBundle,
    bundle_from_files,
    cert_hosts,
    load_certs_pem,
    load_key_pem,
    needs_renewal,
    public_key_matches,
    write_pair,
)

ACME_MODE = "https-acme"
ACME_LIVE_DIR = "acme-live"


def live_dir_name(domain: str) -> str:
    """The directory (under ``certs/acme-live``) for a certificate whose first name is
    ``domain``; ``*`` becomes ``_`` (``_.example.org``), which no host name can clash with."""
    return domain.replace("*", "_")


def acme_live_dir(certs_dir: Path, domain: str) -> Path:
    name = check_acme_names([domain], wildcard_ok=True)[0]
    return certs_dir / ACME_LIVE_DIR / live_dir_name(name)


def _covers(hosts: Sequence[str], names: Sequence[str]) -> bool:
    have = {h.lower() for h in hosts}
    return all(n in have for n in names)


def store_acme_certificate(
    certs_dir: Path,
    domain: str,
    cert_pem: bytes,
    key_pem: bytes,
    names: Sequence[str] | None = None,
) -> CertBundle:
    """Check and save an issued certificate as ``certs/acme-live/<domain>/{fullchain,privkey}.pem``.

    The chain must parse, the key must belong to the leaf, and the leaf must name ``domain`` (and
    every one of ``names``, when given).
    """
    wanted = check_acme_names([domain, *(names or [])], wildcard_ok=True)
    name = wanted[0]
    try:
        chain = load_certs_pem(cert_pem, source=f"certificate for {name}")
        key = load_key_pem(key_pem, source=f"key for {name}")
    except ProxyCertError as exc:
        raise ProxyAcmeError(exc.message) from exc
    if not public_key_matches(chain[0], key):
        raise ProxyAcmeError(f"the issued certificate for {name} does not match its key")
    if not _covers(cert_hosts(chain[0]), wanted):
        raise ProxyAcmeError(f"the issued certificate does not name all of {', '.join(wanted)}")
    directory = acme_live_dir(certs_dir, name)
    with dir_lock(directory):
        write_pair(directory / "fullchain.pem", cert_pem, directory / "privkey.pem", key_pem)
        return bundle_from_files(
            ACME_MODE,
            directory / "fullchain.pem",
            directory / "privkey.pem",
            domain=name,
            issued=True,
        )


def load_acme_certificate(
    certs_dir: Path,
    domain: str,
    *,
    now: datetime | None = None,
    names: Sequence[str] | None = None,
) -> CertBundle | None:
    """The stored certificate for ``domain`` if it is there, readable, not expired, and names
    every one of ``names`` (a certificate for fewer names is not reused)."""
    wanted = check_acme_names([domain, *(names or [])], wildcard_ok=True)
    directory = acme_live_dir(certs_dir, domain)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    if not (cert_path.exists() and key_path.exists()):
        return None
    try:
        bundle = bundle_from_files(ACME_MODE, cert_path, key_path, domain=wanted[0])
    except ProxyCertError:
        return None
    if not _covers(bundle.hosts, wanted):
        return None
    if needs_renewal(load_certs_pem(cert_path.read_bytes())[0], now, days=0):
        return None
    return bundle
