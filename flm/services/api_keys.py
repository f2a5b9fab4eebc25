"""API keys: creation, rotation and revocation. Only the Argon2id hash is ever stored."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, replace
from typing import Any

from flm.core.errors import NotFoundError, UsageError
from flm.core.key_format import generate_key
from flm.storage import Storage
from flm.storage.security import ApiKeyRow, ApiKeysRepo, KeyLimits

MAX_LABEL = 100


def hash_key(plaintext: str) -> str:
    """Argon2id hash with the library's recommended parameters (RFC 9106 low-memory profile)."""
    from argon2 import PasswordHasher

    return PasswordHasher().hash(plaintext)


def dummy_key_hash() -> str:
    """A hash of a random key no one holds, made like every stored one: the gateway verifies
    keys with unknown ids against it, so they cost what a wrong secret costs."""
    from flm.core.key_format import generate_key

    return hash_key(generate_key()[1])


def verify_key_hash(stored_hash: str, plaintext: str) -> bool:
    """Constant-time Argon2id verification; never raises for a wrong key."""
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    try:
        return PasswordHasher().verify(stored_hash, plaintext)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class KeyNotFoundError(NotFoundError):
    code = "KEY_NOT_FOUND"


def _check_label(label: str) -> str:
    label = label.strip()
    if not label or len(label) > MAX_LABEL or not label.isprintable():
        raise UsageError(f"a key label must be 1-{MAX_LABEL} printable characters")
    return label


def key_view(row: ApiKeyRow, today: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """What may be shown about a key: never its hash. ``today``: requests and tokens per key
    since 00:00 UTC."""
    view = asdict(row)
    limits = view.pop("limits")
    view.update(limits)
    view["status"] = "revoked" if row.revoked_at else "active"
    if row.revoked_at is None and row.limits.expires_at is not None:
        from flm.core.timeutil import now_iso, parse_iso

        if parse_iso(row.limits.expires_at) <= parse_iso(now_iso()):
            view["status"] = "expired"
    if today is not None:
        requests, tokens = today.get(row.id, (0, 0))
        view["today"] = {"requests": requests, "tokens": tokens}
    return view


#: The settings ``create`` and ``update`` take, with what each must be.
LIMIT_FIELDS = ("rpm", "burst", "tpm", "daily_tokens", "daily_requests")


def build_limits(base: KeyLimits | None = None, **changes: Any) -> KeyLimits:
    """``base`` with ``changes`` applied and checked. A change of ``None`` leaves a setting
    as it is; ``0`` (limits) or ``[]`` (models) or ``"never"`` (expiry) clears it."""
    from flm.core.keyscope import check_patterns, parse_expiry

    values = asdict(base or KeyLimits())
    for name in LIMIT_FIELDS:
        value = changes.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or value < 0 or value > 10**12:
            raise UsageError(f"--{name.replace('_', '-')} takes a whole number >= 0")
        values[name] = value or None
    models = changes.get("models")
    if models is not None:
        values["models"] = check_patterns(list(models)) or None
    expires = changes.get("expires")
    if expires is not None:
        values["expires_at"] = None if expires in ("never", "") else parse_expiry(expires)
    if changes.get("read_only") is not None:
        values["read_only"] = bool(changes["read_only"])
    if values["burst"] is not None and values["rpm"] is None:
        raise UsageError("--burst needs --rpm (the burst is the request bucket's size)")
    return KeyLimits(**values)


class KeyService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    @property
    def _repo(self) -> ApiKeysRepo:
        return ApiKeysRepo(self._storage.security)

    def create(self, label: str, limits: KeyLimits | None = None) -> tuple[ApiKeyRow, str]:
        label = _check_label(label)
        key_id, plaintext = generate_key()
        row = self._repo.insert(key_id, label, hash_key(plaintext), limits)
        return row, plaintext

    def list(self) -> list[ApiKeyRow]:
        return self._repo.all()

    def update(self, key_id: str, **changes: Any) -> ApiKeyRow:
        """Change an active key's models, limits, expiry or read-only flag (see
        :func:`build_limits`); running proxies apply it once notified."""
        repo = self._repo
        current = repo.get(key_id)
        if current is None or current.revoked_at is not None:
            raise KeyNotFoundError(f"no active API key with id {key_id!r}")
        limits = build_limits(current.limits, **changes)
        if not repo.set_limits(key_id, limits):
            raise KeyNotFoundError(f"API key {key_id} was revoked concurrently")
        updated = repo.get(key_id)
        assert updated is not None
        return updated

    def today(self, key_id: str | None = None) -> dict[str, tuple[int, int]]:
        """(requests, tokens) per key since 00:00 UTC (as written by running proxies); of
        one key when ``key_id`` is given."""
        from flm.storage.usage import today_totals

        return today_totals(self._storage.security, key_id=key_id)

    def revoke(self, key_id: str) -> ApiKeyRow:
        repo = self._repo
        current = repo.get(key_id)
        if current is None:
            raise KeyNotFoundError(f"no API key with id {key_id!r}")
        if current.revoked_at is not None:
            raise KeyNotFoundError(f"API key {key_id} is already revoked ({current.revoked_at})")
        stamp = repo.revoke(key_id)
        if stamp is None:
            raise KeyNotFoundError(f"API key {key_id} was revoked concurrently")
        return replace(current, revoked_at=stamp)

    def rotate(self, key_id: str) -> tuple[ApiKeyRow, ApiKeyRow, str]:
        """A new key with the same label; the old one revoked. Returns (old, new, plaintext)."""
        repo = self._repo
        current = repo.get(key_id)
        if current is None or current.revoked_at is not None:
            raise KeyNotFoundError(f"no active API key with id {key_id!r}")
        new_id, plaintext = generate_key()
        try:
            new_row, stamp = repo.rotate(
                key_id, new_id, current.label, hash_key(plaintext), current.limits
            )
        except LookupError:
            raise KeyNotFoundError(f"API key {key_id} was revoked concurrently") from None
        except sqlite3.Error as exc:  # pragma: no cover - mapped by the writer already
            raise UsageError(str(exc)) from exc
        old = replace(current, revoked_at=stamp)
        return old, new_row, plaintext
