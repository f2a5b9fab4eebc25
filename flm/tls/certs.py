"""X.509 primitives shared by every TLS mode: keys, names, fingerprints, bundles.

FLM generates ECDSA P-256 keys everywhere (fast to create, accepted by every current client and by
ACME CAs). Certificates and keys are PEM files; keys are written 0600 in directories 0700 through
:func:`flm.core.paths.write_private_file`. Every failure to read or parse is a
:class:`~flm.core.errors.ProxyCertError` naming the file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flm.core.errors import ProxyCertError
from flm.core.paths import write_private_file
from flm.core.timeutil import iso, utc_now

#: Keys FLM can sign with or serve. FLM itself only generates P-256 keys.
IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: Certificates are back-dated this much so a client whose clock is a little behind accepts them.
CLOCK_SKEW = timedelta(hours=1)

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


# --- keys and PEM --------------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: IssuerKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key_pem(data: bytes, *, source: str = "private key") -> IssuerKey:
    """Parse an unencrypted PEM private key (EC or RSA)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ProxyCertError(f"{source} is not a readable unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ProxyCertError(f"{source}: only EC and RSA keys are supported")
    return key


def load_certs_pem(data: bytes, *, source: str = "certificate") -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order (leaf first for a chain)."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ProxyCertError(f"{source} is not a readable PEM certificate") from exc
    if not certs:
        raise ProxyCertError(f"{source} holds no certificate")
    return certs


def load_cert_file(path: Path) -> list[x509.Certificate]:
    return load_certs_pem(_read(path), source=str(path))


def load_key_file(path: Path) -> IssuerKey:
    return load_key_pem(_read(path), source=str(path))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ProxyCertError(f"cannot read {path}: {exc.strerror or exc}") from exc


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, as ``AB:CD:…`` (what ``openssl x509 -fingerprint`` prints)."""
    return _colon_hex(cert.fingerprint(hashes.SHA256()))


def fingerprint_sha1(cert: x509.Certificate) -> str:
    """SHA-1 thumbprint as plain upper-case hex (what macOS ``security`` and ``certutil`` take)."""
    return (
        hashlib.sha1(cert.public_bytes(serialization.Encoding.DER), usedforsecurity=False)
        .hexdigest()
        .upper()
    )


def _colon_hex(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def normalize_fingerprint(text: str) -> str:
    """Accept ``ab:cd…``, ``ABCD…`` or ``sha256:…`` and return the ``AB:CD:…`` form."""
    raw = text.strip().lower().removeprefix("sha256:").removeprefix("sha256=")
    raw = raw.replace(":", "").replace(" ", "")
    if not re.fullmatch(r"[0-9a-f]{64}", raw):
        raise ProxyCertError(f"not a SHA-256 fingerprint: {text!r}")
    return _colon_hex(bytes.fromhex(raw))


def public_key_matches(cert: x509.Certificate, key: IssuerKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s key signed ``cert`` (and the names line up)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- names ---------------------------------------------------------------------------------------


def normalize_host(host: str) -> str:
    """A SAN entry in canonical form: an IP in compressed form, or a lower-case ASCII DNS name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.rstrip(".").lower()
    if not name:
        raise ProxyCertError("empty host name for a certificate")
    if "*" in name:
        raise ProxyCertError(f"wildcard names are not supported: {host!r}")
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ProxyCertError(f"not a valid host name: {host!r}") from exc
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ProxyCertError(f"not a valid host name: {host!r}")
    return name


def normalize_hosts(hosts: Iterable[str]) -> tuple[str, ...]:
    """Canonical, de-duplicated SAN list in a stable order (names first, then IPs)."""
    seen = {normalize_host(h) for h in hosts}
    if not seen:
        raise ProxyCertError("a certificate needs at least one host name or address")
    return tuple(sorted(seen, key=lambda h: (_is_ip(h), h)))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        if _is_ip(host):
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        else:
            names.append(x509.DNSName(host))
    return names


def cert_hosts(cert: x509.Certificate) -> tuple[str, ...]:
    """The certificate's SANs (DNS names and IPs), normalized like :func:`normalize_hosts`."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    found: list[str] = [str(n) for n in ext.value.get_values_for_type(x509.DNSName)]
    found += [str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress)]
    try:
        return normalize_hosts(found) if found else ()
    except ProxyCertError:
        return tuple(found)


# --- building certificates -----------------------------------------------------------------------


def build_ca_cert(
    key: IssuerKey, common_name: str, *, not_before: datetime, not_after: datetime
) -> x509.Certificate:
    """A self-signed root that may sign server certificates only (path length 0)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FLM"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def build_server_cert(
    *,
    ca_cert: x509.Certificate,
    ca_key: IssuerKey,
    server_key: IssuerKey,
    hosts: Sequence[str],
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A TLS server certificate for ``hosts`` (already normalized), signed by the CA."""
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(server_key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


# --- renewal -------------------------------------------------------------------------------------


def needs_renewal(
    cert: bytes | x509.Certificate, now: datetime | None = None, days: float = 30
) -> bool:
    """True when the (leaf) certificate expires within ``days`` of ``now`` or is not yet valid."""
    leaf = load_certs_pem(cert)[0] if isinstance(cert, bytes) else cert
    moment = as_utc(now)
    if leaf.not_valid_before_utc > moment + CLOCK_SKEW:
        return True
    return leaf.not_valid_after_utc - moment <= timedelta(days=days)


def as_utc(now: datetime | None) -> datetime:
    """``now`` as an aware UTC datetime (the current time when ``None``; naive means UTC)."""
    if now is None:
        return utc_now()
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


# --- bundles -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertBundle:
    """A server certificate on disk, ready for :func:`flm.tls.context.server_ssl_context`.

    ``cert_path`` holds the leaf followed by the chain the server sends; ``ca_path`` is the root a
    client must trust (FLM's own roots; ``None`` for ACME, whose roots are public).
    """

    mode: str
    cert_path: Path
    key_path: Path
    ca_path: Path | None
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    hosts: tuple[str, ...]
    domain: str | None = None
    #: True when this call created the certificate (False when an existing one was reused).
    issued: bool = False

    @property
    def record_id(self) -> str:
        """Primary key for the ``certificates`` table: one row per mode (and domain)."""
        return f"{self.mode}:{self.domain}" if self.domain else self.mode

    def to_record(self, *, created_at: datetime | None = None) -> dict[str, str | None]:
        """A row for ``security.db``'s ``certificates`` table."""
        return {
            "id": self.record_id,
            "mode": self.mode,
            "domain": self.domain,
            "cert_path": str(self.cert_path),
            "key_path": str(self.key_path),
            "fingerprint_sha256": self.fingerprint_sha256,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "created_at": iso(created_at or utc_now()),
        }

    def to_dict(self) -> dict[str, Any]:
        """What ``flm proxy status`` shows (no key material, only paths)."""
        return {
            "mode": self.mode,
            "domain": self.domain,
            "hosts": list(self.hosts),
            "cert_path": str(self.cert_path),
            "ca_path": str(self.ca_path) if self.ca_path else None,
            "fingerprint_sha256": self.fingerprint_sha256,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
        }


@dataclass(frozen=True)
class CaBundle:
    """A root CA on disk. The key file never leaves FLM's data directory."""

    mode: str
    cert_path: Path
    key_path: Path
    fingerprint_sha256: str
    subject: str
    not_before: datetime
    not_after: datetime
    #: True when this call created the CA.
    created: bool = False

    def load(self) -> tuple[x509.Certificate, IssuerKey]:
        cert = load_cert_file(self.cert_path)[0]
        key = load_key_file(self.key_path)
        if not public_key_matches(cert, key):
            raise ProxyCertError(f"{self.key_path} does not belong to {self.cert_path}")
        return cert, key

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "cert_path": str(self.cert_path),
            "subject": self.subject,
            "fingerprint_sha256": self.fingerprint_sha256,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
        }


def bundle_from_files(
    mode: str,
    cert_path: Path,
    key_path: Path,
    *,
    ca_path: Path | None = None,
    domain: str | None = None,
    issued: bool = False,
) -> CertBundle:
    """Describe an existing certificate/key pair; checks that the key belongs to the leaf."""
    leaf = load_cert_file(cert_path)[0]
    key = load_key_file(key_path)
    if not public_key_matches(leaf, key):
        raise ProxyCertError(f"{key_path} does not belong to {cert_path}")
    return CertBundle(
        mode=mode,
        cert_path=cert_path,
        key_path=key_path,
        ca_path=ca_path,
        fingerprint_sha256=fingerprint_sha256(leaf),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        hosts=cert_hosts(leaf),
        domain=domain,
        issued=issued,
    )


def write_pair(cert_path: Path, cert_pem: bytes, key_path: Path, key_pem: bytes) -> None:
    """Write the key first, then the certificate (both 0600, atomically replaced).

    A crash between the two leaves a key that does not match the old certificate, which the
    ``ensure_*`` functions detect and repair by issuing again.
    """
    write_private_file(key_path, key_pem)
    write_private_file(cert_path, cert_pem)
