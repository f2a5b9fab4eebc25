"""Installing FLM's root CA into the operating system's trust store, and removing it.

Every operation is first described as an :class:`InstallPlan`: the certificate (subject and SHA-256
fingerprint), the files written or removed, the exact commands, and whether administrator rights
are needed. ``dry_run=True`` returns the plan without touching anything; otherwise the plan is
carried out step by step and returned with ``executed=True``.

- Debian/Ubuntu: write ``/usr/local/share/ca-certificates/<name>.crt`` and run
  ``update-ca-certificates``; to remove, delete it and run ``update-ca-certificates --fresh``.
- Fedora/RHEL: the same with ``/etc/pki/ca-trust/source/anchors/`` and ``update-ca-trust extract``.
- macOS: ``security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain CERT``;
  to remove, ``security remove-trusted-cert -d CERT`` then
  ``security delete-certificate -Z <SHA-1> /Library/Keychains/System.keychain``.
- Windows: ``certutil -addstore -f ROOT CERT``; to remove, ``certutil -delstore ROOT <SHA-1>``.

The certificate is checked before anything happens: one PEM (or DER) certificate, a CA, self-signed,
not expired, and — when the caller passes ``expected_fingerprint`` — exactly that one. On Linux the
bytes that were checked are the bytes written, so the file cannot change in between.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from flm.core.errors import ProxyCertError
from flm.tls.certs import (
    as_utc,
    cert_to_pem,
    fingerprint_sha1,
    fingerprint_sha256,
    is_issued_by,
    normalize_fingerprint,
)

#: The file name (without ``.crt``) FLM's root gets in the Linux trust store directories.
DEFAULT_STORE_NAME = "flm-local-ca"
#: The name to use for the ``dev-selfsigned`` root, so both roots can be trusted side by side.
DEV_STORE_NAME = "flm-dev-ca"

Platform = Literal["debian", "fedora", "macos", "windows"]
Runner = Callable[[Sequence[str]], None]

_DEBIAN_DIR = Path("/usr/local/share/ca-certificates")
_FEDORA_DIR = Path("/etc/pki/ca-trust/source/anchors")
_MAC_KEYCHAIN = "/Library/Keychains/System.keychain"


@dataclass(frozen=True)
class InstallPlan:
    """What installing or removing a root will do (or did)."""

    action: Literal["install", "uninstall"]
    platform: Platform
    cert_path: Path | None
    fingerprint_sha256: str | None
    subject: str | None
    #: Files written (install, mode 0644) or removed (uninstall) before the commands run.
    files_to_write: tuple[Path, ...] = ()
    files_to_remove: tuple[Path, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()
    needs_privileges: bool = True
    has_privileges: bool = False
    dry_run: bool = True
    executed: bool = False
    #: Uninstall only: False when there was nothing installed under this name.
    installed: bool = True
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "platform": self.platform,
            "cert_path": str(self.cert_path) if self.cert_path else None,
            "fingerprint_sha256": self.fingerprint_sha256,
            "subject": self.subject,
            "files_to_write": [str(p) for p in self.files_to_write],
            "files_to_remove": [str(p) for p in self.files_to_remove],
            "commands": [list(c) for c in self.commands],
            "needs_privileges": self.needs_privileges,
            "has_privileges": self.has_privileges,
            "dry_run": self.dry_run,
            "executed": self.executed,
            "installed": self.installed,
            "notes": list(self.notes),
        }


def detect_platform() -> Platform:
    """Which trust store this machine uses; :class:`ProxyCertError` when FLM knows none."""
    if sys.platform == "darwin":
        return "macos"
    if sys.platform == "win32":
        return "windows"
    if sys.platform.startswith("linux"):
        if shutil.which("update-ca-certificates"):
            return "debian"
        if shutil.which("update-ca-trust"):
            return "fedora"
        raise ProxyCertError(
            "no supported trust store tool found: install the `ca-certificates` package "
            "(which provides update-ca-certificates) or trust the certificate manually"
        )
    raise ProxyCertError(f"installing a CA is not supported on {sys.platform}")


def is_privileged() -> bool:
    """Root on POSIX; an elevated administrator on Windows."""
    if sys.platform == "win32":
        import ctypes

        try:
            return bool(ctypes.windll.shell32.IsUserAnAdmin())
        except OSError:
            return False
    return os.geteuid() == 0


@dataclass(frozen=True)
class CheckedCert:
    """A certificate that passed the checks, with the PEM bytes that were checked."""

    path: Path
    pem: bytes
    cert: x509.Certificate
    fingerprint_sha256: str


def check_ca_file(
    cert_path: Path, *, expected_fingerprint: str | None = None, now: datetime | None = None
) -> CheckedCert:
    """Read and verify a root certificate file before it goes anywhere near a trust store."""
    try:
        data = Path(cert_path).read_bytes()
    except OSError as exc:
        raise ProxyCertError(f"cannot read {cert_path}: {exc.strerror or exc}") from exc
    certs = _parse_any(data, cert_path)
    if len(certs) != 1:
        raise ProxyCertError(f"{cert_path} must hold exactly one certificate, found {len(certs)}")
    cert = certs[0]
    fingerprint = fingerprint_sha256(cert)
    expected = normalize_fingerprint(expected_fingerprint) if expected_fingerprint else None
    if expected is not None and expected != fingerprint:
        raise ProxyCertError(
            f"{cert_path} is not the expected certificate (SHA-256 fingerprint {fingerprint})",
            details={"fingerprint_sha256": fingerprint},
        )
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ProxyCertError(f"{cert_path} is not a CA certificate; only a root CA can be trusted")
    if cert.issuer != cert.subject or not is_issued_by(cert, cert):
        raise ProxyCertError(f"{cert_path} is not a self-signed root certificate")
    moment = as_utc(now)
    if cert.not_valid_after_utc <= moment:
        raise ProxyCertError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return CheckedCert(Path(cert_path), cert_to_pem(cert), cert, fingerprint)


def _parse_any(data: bytes, source: Path) -> list[x509.Certificate]:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise ProxyCertError(f"{source} is not a readable certificate (PEM or DER)") from exc


def plan_install(
    cert_path: Path,
    *,
    expected_fingerprint: str | None = None,
    store_name: str = DEFAULT_STORE_NAME,
    platform: Platform | None = None,
) -> tuple[InstallPlan, CheckedCert]:
    """The plan for :func:`install_ca`, without doing anything."""
    checked = check_ca_file(cert_path, expected_fingerprint=expected_fingerprint)
    plat = platform or detect_platform()
    _check_store_name(store_name)
    src = str(checked.path)
    writes: tuple[Path, ...] = ()
    if plat == "debian":
        writes = (_DEBIAN_DIR / f"{store_name}.crt",)
        commands: tuple[tuple[str, ...], ...] = (("update-ca-certificates",),)
    elif plat == "fedora":
        writes = (_FEDORA_DIR / f"{store_name}.crt",)
        commands = (("update-ca-trust", "extract"),)
    elif plat == "macos":
        commands = (
            ("security", "add-trusted-cert", "-d", "-r", "trustRoot", "-k", _MAC_KEYCHAIN, src),
        )
    else:
        commands = (("certutil", "-addstore", "-f", "ROOT", src),)
    plan = InstallPlan(
        action="install",
        platform=plat,
        cert_path=checked.path,
        fingerprint_sha256=checked.fingerprint_sha256,
        subject=checked.cert.subject.rfc4514_string(),
        files_to_write=writes,
        commands=commands,
        needs_privileges=True,
        has_privileges=is_privileged(),
        notes=_install_notes(plat),
    )
    return plan, checked


def install_ca(
    cert_path: Path,
    *,
    dry_run: bool = False,
    expected_fingerprint: str | None = None,
    store_name: str = DEFAULT_STORE_NAME,
    platform: Platform | None = None,
    runner: Runner | None = None,
) -> InstallPlan:
    """Trust ``cert_path`` system-wide (see the module table). Returns the plan it carried out."""
    plan, checked = plan_install(
        cert_path,
        expected_fingerprint=expected_fingerprint,
        store_name=store_name,
        platform=platform,
    )
    if dry_run:
        return plan
    _require_privileges(plan)
    for target in plan.files_to_write:
        _write_public(target, checked.pem)
    _run_all(plan.commands, runner)
    return replace(plan, dry_run=False, executed=True)


def plan_uninstall(
    cert_path: Path | None = None,
    *,
    store_name: str = DEFAULT_STORE_NAME,
    platform: Platform | None = None,
) -> InstallPlan:
    """The plan for :func:`uninstall_ca`, without doing anything."""
    plat = platform or detect_platform()
    _check_store_name(store_name)
    if plat in ("debian", "fedora"):
        target = (_DEBIAN_DIR if plat == "debian" else _FEDORA_DIR) / f"{store_name}.crt"
        fingerprint = subject = None
        if target.exists():
            try:
                installed = _parse_any(target.read_bytes(), target)[0]
            except (OSError, ProxyCertError, IndexError):
                pass
            else:
                fingerprint = fingerprint_sha256(installed)
                subject = installed.subject.rfc4514_string()
        command = (
            ("update-ca-certificates", "--fresh")
            if plat == "debian"
            else ("update-ca-trust", "extract")
        )
        present = target.exists()
        return InstallPlan(
            action="uninstall",
            platform=plat,
            cert_path=target if present else None,
            fingerprint_sha256=fingerprint,
            subject=subject,
            files_to_remove=(target,) if present else (),
            commands=(command,) if present else (),
            needs_privileges=present,
            has_privileges=is_privileged(),
            installed=present,
        )
    if cert_path is None:
        raise ProxyCertError(
            "removing a CA on this platform needs the certificate file (--cert-path) to find it"
        )
    cert = _parse_any(_read(cert_path), cert_path)[0]
    sha1 = fingerprint_sha1(cert)
    if plat == "macos":
        commands: tuple[tuple[str, ...], ...] = (
            ("security", "remove-trusted-cert", "-d", str(cert_path)),
            ("security", "delete-certificate", "-Z", sha1, _MAC_KEYCHAIN),
        )
    else:
        commands = (("certutil", "-delstore", "ROOT", sha1),)
    return InstallPlan(
        action="uninstall",
        platform=plat,
        cert_path=Path(cert_path),
        fingerprint_sha256=fingerprint_sha256(cert),
        subject=cert.subject.rfc4514_string(),
        commands=commands,
        needs_privileges=True,
        has_privileges=is_privileged(),
    )


def uninstall_ca(
    cert_path: Path | None = None,
    *,
    dry_run: bool = False,
    store_name: str = DEFAULT_STORE_NAME,
    platform: Platform | None = None,
    runner: Runner | None = None,
) -> InstallPlan:
    """Stop trusting FLM's root system-wide. A no-op (``installed=False``) if it is not there."""
    plan = plan_uninstall(cert_path, store_name=store_name, platform=platform)
    if dry_run or not plan.installed:
        return plan
    _require_privileges(plan)
    for target in plan.files_to_remove:
        try:
            target.unlink(missing_ok=True)
        except OSError as exc:
            raise ProxyCertError(f"cannot remove {target}: {exc.strerror or exc}") from exc
    _run_all(plan.commands, runner)
    return replace(plan, dry_run=False, executed=True)


# --- internals -----------------------------------------------------------------------------------


def _check_store_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ProxyCertError(f"invalid trust store name {name!r}")


def _install_notes(plat: Platform) -> tuple[str, ...]:
    notes = [
        "Firefox keeps its own store: import the certificate there, or enable "
        "security.enterprise_roots.enabled"
    ]
    if plat in ("debian", "fedora"):
        notes.append("programs using their own CA bundle (Python certifi, Node) need it separately")
    return tuple(notes)


def _require_privileges(plan: InstallPlan) -> None:
    if plan.needs_privileges and not plan.has_privileges:
        how = "an administrator prompt" if plan.platform == "windows" else "sudo"
        raise ProxyCertError(
            f"changing the system trust store needs administrator rights: run the command again "
            f"with {how}",
            details=plan.to_dict(),
        )


def _write_public(target: Path, pem: bytes) -> None:
    """Trust store entries are public certificates: 0644, replaced atomically."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except OSError as exc:
        raise ProxyCertError(f"cannot write {target}: {exc.strerror or exc}") from exc


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ProxyCertError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _run_all(commands: Sequence[Sequence[str]], runner: Runner | None) -> None:
    run = runner or _run
    for argv in commands:
        run(argv)


def _run(argv: Sequence[str]) -> None:
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=180, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProxyCertError(f"could not run {argv[0]}: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ProxyCertError(
            f"`{' '.join(argv)}` failed with exit code {result.returncode}: {' '.join(tail)}"
        )
