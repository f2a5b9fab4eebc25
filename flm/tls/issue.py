"""Certificates FLM issues itself: the ``dev-selfsigned`` and ``packaged-ca`` modes.

Both modes keep a root CA and one server certificate in their own directory under
``certs_dir`` (``$FLM_HOME/certs``)::

    dev-selfsigned/ca.pem  ca-key.pem  server.pem  server-key.pem
    packaged-ca/root-ca.pem  root-ca-key.pem  server.pem  server-key.pem

Keys are 0600, directories 0700. Every ``ensure_*`` call reuses what is on disk while it is still
good and issues again otherwise, so calling it at every proxy start is cheap (no key generation
when nothing changed). ``now`` and the validity periods are parameters so tests can move time.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from flm.core.errors import ProxyCertError
from flm.core.paths import ensure_private_dir
from flm.tls._fs import dir_lock
from flm.tls.certs import (
    CLOCK_SKEW,
    CaBundle,
    CertBundle,
    as_utc,
    build_ca_cert,
    build_server_cert,
    bundle_from_files,
    cert_hosts,
    cert_to_pem,
    fingerprint_sha256,
    generate_key,
    is_issued_by,
    key_to_pem,
    load_cert_file,
    load_key_file,
    needs_renewal,
    normalize_hosts,
    public_key_matches,
    write_pair,
)
from flm.tls.lan import lan_addresses as detect_lan_addresses

DEV_MODE = "dev-selfsigned"
LOCAL_CA_MODE = "packaged-ca"

#: Validity of the development root; it is replaced (with a new server certificate) 30 days
#: before it ends, so the user must trust the new root again.
DEV_CA_DAYS = 825
#: Validity of the long-lived local root (``packaged-ca``), created once per installation.
LOCAL_CA_DAYS = 3650
#: Server certificates: 397 days, the longest any browser accepts.
SERVER_DAYS = 397
#: Re-issue this many days before the end (or after two thirds of a shorter validity).
RENEW_BEFORE_DAYS = 30

_SERVER_CERT = "server.pem"
_SERVER_KEY = "server-key.pem"


def default_server_hosts(lan_addresses: Sequence[str] | None = None) -> tuple[str, ...]:
    """``localhost``, ``127.0.0.1``, ``::1`` and the LAN addresses (detected when ``None``)."""
    lan = detect_lan_addresses() if lan_addresses is None else list(lan_addresses)
    return normalize_hosts(["localhost", "127.0.0.1", "::1", *lan])


def ensure_dev_selfsigned(
    certs_dir: Path,
    *,
    lan_addresses: Sequence[str] | None = None,
    now: datetime | None = None,
    validity_days: float = SERVER_DAYS,
) -> CertBundle:
    """The ``dev-selfsigned`` root and server certificate, created or reused.

    The server certificate names ``localhost``, ``127.0.0.1``, ``::1`` and the LAN addresses; it
    is issued again when it nears its end, when the set of names changed (a new DHCP address), or
    when the root was replaced.
    """
    directory = ensure_private_dir(certs_dir / DEV_MODE)
    hosts = default_server_hosts(lan_addresses)
    with dir_lock(directory):
        ca = _ensure_ca(
            directory,
            mode=DEV_MODE,
            cert_name="ca.pem",
            key_name="ca-key.pem",
            title="FLM Development CA",
            days=DEV_CA_DAYS,
            now=now,
            replace_when_expiring=True,
        )
        return _ensure_server(ca, directory, hosts, validity_days=validity_days, now=now)


def local_ca_paths(certs_dir: Path) -> tuple[Path, Path]:
    """Where the ``packaged-ca`` root certificate and key live (certificate, key)."""
    directory = certs_dir / LOCAL_CA_MODE
    return directory / "root-ca.pem", directory / "root-ca-key.pem"


def ensure_local_ca(
    certs_dir: Path, *, now: datetime | None = None, validity_days: float = LOCAL_CA_DAYS
) -> CaBundle:
    """The installation's long-lived local root (``packaged-ca``), created on first use.

    It is never replaced silently: it may be installed in the OS trust store, so a missing key or
    an expired root is a :class:`ProxyCertError` that names the recovery steps.
    """
    directory = ensure_private_dir(certs_dir / LOCAL_CA_MODE)
    with dir_lock(directory):
        return _ensure_ca(
            directory,
            mode=LOCAL_CA_MODE,
            cert_name="root-ca.pem",
            key_name="root-ca-key.pem",
            title="FLM Local Root CA",
            days=validity_days,
            now=now,
            replace_when_expiring=False,
        )


def ensure_server_cert(
    ca: CaBundle,
    certs_dir: Path,
    hosts: Sequence[str],
    validity_days: float = SERVER_DAYS,
    now: datetime | None = None,
    *,
    renew_before_days: float | None = None,
) -> CertBundle:
    """A server certificate for ``hosts`` signed by ``ca``, reused while valid.

    Issued again when missing, unreadable, not signed by ``ca``, naming other hosts, or within
    ``renew_before_days`` of its end (default: 30 days, or a third of a shorter validity).
    """
    directory = ensure_private_dir(certs_dir / ca.mode)
    with dir_lock(directory):
        return _ensure_server(
            ca,
            directory,
            normalize_hosts(hosts),
            validity_days=validity_days,
            now=now,
            renew_before_days=renew_before_days,
        )


# --- internals -----------------------------------------------------------------------------------


def _ensure_ca(
    directory: Path,
    *,
    mode: str,
    cert_name: str,
    key_name: str,
    title: str,
    days: float,
    now: datetime | None,
    replace_when_expiring: bool,
) -> CaBundle:
    moment = as_utc(now)
    cert_path, key_path = directory / cert_name, directory / key_name
    problem = None
    if cert_path.exists() or key_path.exists():
        try:
            cert = load_cert_file(cert_path)[0]
            key = load_key_file(key_path)
        except ProxyCertError as exc:
            problem = exc.message
        else:
            if not public_key_matches(cert, key):
                problem = f"{key_path} does not belong to {cert_path}"
            elif cert.not_valid_after_utc <= moment:
                problem = f"the root CA {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
            elif replace_when_expiring and needs_renewal(cert, moment, RENEW_BEFORE_DAYS):
                problem = "the root CA is about to expire"
            else:
                return _ca_bundle(mode, cert_path, key_path, cert, created=False)
        if not replace_when_expiring:
            raise ProxyCertError(
                f"FLM's local root CA cannot be used: {problem}. To start over: run "
                "`flm security uninstall-ca`, delete "
                f"{directory}, then start the proxy again and run `flm security install-ca`.",
                details={"cert_path": str(cert_path), "key_path": str(key_path)},
            )
    key = generate_key()
    common_name = f"{title} {_short_hostname()} {moment:%Y-%m-%d}"[:64]
    cert = build_ca_cert(
        key,
        common_name,
        not_before=moment - CLOCK_SKEW,
        not_after=moment + timedelta(days=days),
    )
    write_pair(cert_path, cert_to_pem(cert), key_path, key_to_pem(key))
    return _ca_bundle(mode, cert_path, key_path, cert, created=True)


def _ca_bundle(
    mode: str, cert_path: Path, key_path: Path, cert: x509.Certificate, *, created: bool
) -> CaBundle:
    return CaBundle(
        mode=mode,
        cert_path=cert_path,
        key_path=key_path,
        fingerprint_sha256=fingerprint_sha256(cert),
        subject=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        created=created,
    )


def _ensure_server(
    ca: CaBundle,
    directory: Path,
    hosts: tuple[str, ...],
    *,
    validity_days: float,
    now: datetime | None,
    renew_before_days: float | None = None,
) -> CertBundle:
    moment = as_utc(now)
    if validity_days <= 0:
        raise ProxyCertError("certificate validity must be positive")
    renew_days = (
        renew_before_days
        if renew_before_days is not None
        else min(RENEW_BEFORE_DAYS, validity_days / 3)
    )
    ca_cert, ca_key = ca.load()
    cert_path, key_path = directory / _SERVER_CERT, directory / _SERVER_KEY
    if cert_path.exists() and key_path.exists():
        try:
            leaf = load_cert_file(cert_path)[0]
            key = load_key_file(key_path)
        except ProxyCertError:
            pass
        else:
            if (
                public_key_matches(leaf, key)
                and is_issued_by(leaf, ca_cert)
                and cert_hosts(leaf) == hosts
                and not needs_renewal(leaf, moment, renew_days)
            ):
                return bundle_from_files(ca.mode, cert_path, key_path, ca_path=ca.cert_path)
    server_key = generate_key()
    leaf = build_server_cert(
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_key=server_key,
        hosts=hosts,
        not_before=moment - CLOCK_SKEW,
        not_after=moment + timedelta(days=validity_days),
    )
    if leaf.not_valid_after_utc <= moment:
        raise ProxyCertError(
            f"the root CA {ca.cert_path} has expired; it cannot issue certificates"
        )
    write_pair(cert_path, cert_to_pem(leaf), key_path, key_to_pem(server_key))
    return bundle_from_files(ca.mode, cert_path, key_path, ca_path=ca.cert_path, issued=True)


def _short_hostname() -> str:
    try:
        return socket.gethostname().split(".", 1)[0][:24] or "localhost"
    except OSError:
        return "localhost"
