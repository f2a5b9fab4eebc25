"""DNS-01 credential profiles (``flm secrets dns add/list/remove``).

A profile is a name, a provider (``rfc2136`` or ``cloudflare``), non-secret settings (server,
zone, TSIG key name and algorithm, API base URL, the servers to watch for propagation) and one
secret (the TSIG key, or the API token).

Where things live:

- the non-secret settings: ``security.db``'s ``dns_credentials`` table (``settings_json``), with
  ``secret_ref`` saying where the secret is — never the secret itself;
- the secret: the OS keyring (the ``keyring`` library: Secret Service, macOS Keychain, Windows
  Credential Locker) when a real backend is usable, otherwise a 0600 file in
  ``$FLM_HOME/secrets/dns/`` (directory 0700). ``FLM_SECRETS_BACKEND=file|keyring`` forces one.

Secrets are read from a file or standard input only (never the command line), are never logged,
never put in error messages, and never returned by :meth:`DnsSecretsService.list`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import os
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flm.core.errors import FlmError, NotFoundError, UsageError
from flm.core.paths import ensure_private_dir, write_private_file
from flm.core.timeutil import now_iso
from flm.storage import Storage
from flm.storage.records import DnsCredentialsRepo
from flm.tls.dns01 import CLOUDFLARE_API, parse_server

PROVIDERS = ("rfc2136", "cloudflare")
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")
#: How long FLM waits by default for the zone's servers to answer a new TXT record.
DEFAULT_PROPAGATION_S = 120.0
KEYRING_SERVICE = "flm-dns"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MAX_SECRET = 4096


class DnsProfileNotFoundError(NotFoundError):
    code = "DNS_PROFILE_NOT_FOUND"


class SecretStoreError(FlmError):
    code = "SECRET_STORE_ERROR"


@dataclass(frozen=True)
class DnsProfile:
    """A profile without its secret (what ``list`` shows)."""

    name: str
    provider: str
    settings: dict[str, Any] = field(default_factory=dict)
    secret_ref: str = ""
    created_at: str = ""

    @property
    def zone(self) -> str:
        return str(self.settings.get("zone") or "")

    @property
    def propagation_timeout_s(self) -> float:
        return float(self.settings.get("propagation_timeout_s") or DEFAULT_PROPAGATION_S)

    def view(self) -> dict[str, Any]:
        """Safe to print: settings and where the secret lives, never the secret."""
        backend, _, _where = self.secret_ref.partition(":")
        return {
            "name": self.name,
            "provider": self.provider,
            **self.settings,
            "secret_store": backend,
            "created_at": self.created_at,
        }


# --- the secret store ----------------------------------------------------------------------------


def usable_keyring() -> Any | None:
    """The OS keyring backend when a real one is usable; ``None`` for the fail/null backends.

    ``keyring.get_keyring()`` never fails: with no usable store it returns the ``fail`` backend
    (every call raises) or a chainer over nothing; both mean "no keyring here".
    """
    try:
        import keyring
        from keyring.backends import chainer, fail
    except ImportError:  # pragma: no cover - keyring is a dependency
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:
        return None
    candidates = (
        list(backend.backends) if isinstance(backend, chainer.ChainerBackend) else [backend]
    )
    real = []
    for candidate in candidates:
        if isinstance(candidate, fail.Keyring) or type(candidate).__module__.endswith(".null"):
            continue
        try:
            if float(candidate.priority) <= 0:
                continue
        except Exception:  # noqa: S112 - a backend whose priority raises is not usable
            continue
        real.append(candidate)
    return backend if real else None


class SecretStore:
    """Where DNS secrets live: the OS keyring, or 0600 files under the data directory."""

    def __init__(self, home: Path, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self.dir = home / "secrets" / "dns"
        forced = (environ.get("FLM_SECRETS_BACKEND") or "").strip().lower()
        if forced not in ("", "auto", "file", "keyring"):
            raise UsageError("FLM_SECRETS_BACKEND must be file, keyring or auto")
        self._keyring = None if forced == "file" else usable_keyring()
        if forced == "keyring" and self._keyring is None:
            raise SecretStoreError(
                "FLM_SECRETS_BACKEND=keyring, but no usable OS keyring was "
                "found (install and unlock one, or use the file store)"
            )

    @property
    def backend(self) -> str:
        return "keyring" if self._keyring is not None else "file"

    def describe(self) -> str:
        if self._keyring is not None:
            return (
                f"OS keyring ({type(self._keyring).__module__}.{type(self._keyring).__name__}"
                f"), service {KEYRING_SERVICE!r}"
            )
        return f"files (mode 0600) in {self.dir}"

    def _file(self, name: str) -> Path:
        return self.dir / f"{name}.secret"

    def put(self, name: str, secret: str) -> str:
        if self._keyring is not None:
            try:
                self._keyring.set_password(KEYRING_SERVICE, name, secret)
            except Exception as exc:
                raise SecretStoreError(
                    f"could not store the secret of DNS profile {name!r} in "
                    f"the OS keyring ({type(exc).__name__})"
                ) from None
            return f"keyring:{KEYRING_SERVICE}/{name}"
        ensure_private_dir(self.dir.parent)
        ensure_private_dir(self.dir)
        write_private_file(self._file(name), secret.encode())
        return f"file:{self._file(name)}"

    def get(self, name: str, ref: str) -> str:
        backend, _, where = ref.partition(":")
        if backend == "keyring":
            keyring = self._keyring or usable_keyring()
            value = None
            if keyring is not None:
                try:
                    value = keyring.get_password(KEYRING_SERVICE, name)
                except Exception:
                    value = None
            if value is None:
                raise SecretStoreError(
                    f"the secret of DNS profile {name!r} is not in the OS "
                    "keyring any more (or the keyring is locked): unlock it, "
                    f"or add the profile again (`flm secrets dns add {name} "
                    "...`)"
                )
            return str(value)
        if backend == "file":
            try:
                return Path(where).read_text().strip()
            except OSError as exc:
                raise SecretStoreError(
                    f"cannot read the secret of DNS profile {name!r} from "
                    f"{where}: {exc.strerror}; add the profile again"
                ) from None
        raise SecretStoreError(f"DNS profile {name!r} has an unknown secret reference")

    def delete(self, name: str, ref: str) -> None:
        backend, _, where = ref.partition(":")
        if backend == "keyring":
            keyring = self._keyring or usable_keyring()
            if keyring is not None:
                with contextlib.suppress(Exception):  # already gone
                    keyring.delete_password(KEYRING_SERVICE, name)
        elif backend == "file":
            Path(where).unlink(missing_ok=True)


# --- the service ---------------------------------------------------------------------------------


class DnsSecretsService:
    def __init__(self, storage: Storage, env: Mapping[str, str] | None = None) -> None:
        self._storage = storage
        self._env = env
        self._store: SecretStore | None = None

    @property
    def _repo(self) -> DnsCredentialsRepo:
        return DnsCredentialsRepo(self._storage.security)

    @property
    def store(self) -> SecretStore:
        if self._store is None:
            self._store = SecretStore(self._storage.paths.home, self._env)
        return self._store

    def add(
        self,
        name: str,
        provider: str,
        settings: Mapping[str, Any],
        secret: str,
        *,
        replace: bool = False,
    ) -> DnsProfile:
        name = check_profile_name(name)
        if provider not in PROVIDERS:
            raise UsageError(f"unknown DNS provider {provider!r}; choose {', '.join(PROVIDERS)}")
        clean = check_settings(provider, settings)
        secret = check_secret(provider, secret)
        existing = self._row(name)
        if existing is not None and not replace:
            raise UsageError(
                f"a DNS profile named {name!r} exists; remove it first or pass --replace"
            )
        ref = self.store.put(name, secret)
        created = now_iso()

        try:
            self._repo.upsert(name, provider, ref, created, json.dumps(clean, sort_keys=True))
        except BaseException:
            if existing is None:
                self.store.delete(name, ref)
            raise
        if existing is not None and existing.secret_ref != ref:
            self.store.delete(name, existing.secret_ref)
        return DnsProfile(name, provider, clean, ref, created)

    def list(self) -> list[DnsProfile]:
        return [_profile(r) for r in self._repo.all()]

    def get(self, name: str) -> DnsProfile:
        row = self._row(name)
        if row is None:
            known = ", ".join(p.name for p in self.list()) or "none"
            raise DnsProfileNotFoundError(
                f"no DNS profile named {name!r} (profiles: {known}); create one with "
                f"`flm secrets dns add {name} --provider ...`"
            )
        return row

    def secret(self, profile: DnsProfile) -> str:
        return self.store.get(profile.name, profile.secret_ref)

    def remove(self, name: str) -> DnsProfile:
        profile = self.get(name)
        self._repo.delete(name)
        self.store.delete(profile.name, profile.secret_ref)
        return profile

    def _row(self, name: str) -> DnsProfile | None:
        row = self._repo.get(name)
        return _profile(row) if row is not None else None


def _profile(row: sqlite3.Row) -> DnsProfile:
    try:
        settings = json.loads(row["settings_json"] or "{}")
    except (ValueError, IndexError):
        settings = {}
    return DnsProfile(
        row["id"],
        row["provider"],
        settings if isinstance(settings, dict) else {},
        row["secret_ref"],
        row["created_at"],
    )


# --- validation ----------------------------------------------------------------------------------


def check_profile_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise UsageError(
            "a DNS profile name is 1-63 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )
    return name


def _zone(text: str) -> str:
    zone = (text or "").strip().rstrip(".").lower()
    if not zone or "*" in zone or any(c.isspace() for c in zone):
        raise UsageError(f"--zone must be a DNS zone name like example.org, got {text!r}")
    return zone


def check_settings(provider: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The non-secret settings, validated and normalised."""
    out: dict[str, Any] = {"zone": _zone(str(settings.get("zone") or ""))}
    checks = [
        f"{h}:{p}" for h, p in (parse_server(str(s)) for s in settings.get("check_servers") or [])
    ]
    if checks:
        out["check_servers"] = checks
    timeout = settings.get("propagation_timeout_s")
    if timeout is not None:
        value = float(timeout)
        if not 0 < value <= 3600:
            raise UsageError("--propagation-timeout must be 1-3600 seconds")
        out["propagation_timeout_s"] = value
    if provider == "rfc2136":
        server = settings.get("server")
        if not server:
            raise UsageError(
                "--provider rfc2136 needs --server HOST[:PORT] (the primary DNS "
                "server that accepts dynamic updates)"
            )
        host, port = parse_server(str(server))
        out["server"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tsig_name = str(settings.get("tsig_name") or "").strip().rstrip(".")
        if not tsig_name:
            raise UsageError(
                "--provider rfc2136 needs --tsig-name (the TSIG key's name as the "
                "DNS server knows it)"
            )
        out["tsig_name"] = tsig_name
        algorithm = str(settings.get("tsig_algorithm") or "hmac-sha256").lower()
        if algorithm not in TSIG_ALGORITHMS:
            raise UsageError(f"--tsig-algorithm must be one of {', '.join(TSIG_ALGORITHMS)}")
        out["tsig_algorithm"] = algorithm
    elif provider == "cloudflare":
        base = str(settings.get("api_base") or CLOUDFLARE_API).rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise UsageError(f"--api-base must be an http(s) URL, got {base!r}")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise UsageError(
                "--api-base may use plain http only on loopback (the API token "
                "would travel in clear)"
            )
        out["api_base"] = base
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_secret(provider: str, secret: str) -> str:
    value = (secret or "").strip()
    if not value:
        raise UsageError("the secret is empty (give it in the file or on standard input)")
    if len(value) > _MAX_SECRET or any(c.isspace() for c in value):
        raise UsageError("the secret must be one line without spaces, at most 4096 characters")
    if provider == "rfc2136":
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(
                "the TSIG secret must be base64 (as in the server's `key` "
                "statement, e.g. from `tsig-keygen`)"
            ) from None
        if len(raw) < 16:
            raise UsageError(
                "the TSIG secret is shorter than 128 bits; generate a new key "
                "with `tsig-keygen -a hmac-sha256 NAME`"
            )
    return value
