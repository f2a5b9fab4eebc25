"""API keys: creation, rotation and revocation. Only the Argon2id hash is ever stored."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict
from typing import Any

from flm.core.errors import NotFoundError, UsageError
from flm.core.keys import generate_key
from flm.storage import Storage
from flm.storage.security import ApiKeyRow, ApiKeysRepo

MAX_LABEL = 100


def hash_key(plaintext: str) -> str:
    """Argon2id hash with the library's recommended parameters (RFC 9106 low-memory profile)."""
    from argon2 import PasswordHasher

    return PasswordHasher().hash(plaintext)


def dummy_key_hash() -> str:
    """A hash of a random key no one holds, made like every stored one: the gateway verifies
    keys with unknown ids against it, so they cost what a wrong secret costs."""
    from flm.core.keys import generate_key

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


def key_view(row: ApiKeyRow) -> dict[str, Any]:
    """What may be shown about a key: never its hash."""
    view = asdict(row)
    view["status"] = "revoked" if row.revoked_at else "active"
    return view


class KeyService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    @property
    def _repo(self) -> ApiKeysRepo:
        return ApiKeysRepo(self._storage.security)

    def create(self, label: str) -> tuple[ApiKeyRow, str]:
        label = _check_label(label)
        key_id, plaintext = generate_key()
        row = self._repo.insert(key_id, label, hash_key(plaintext))
        return row, plaintext

    def list(self) -> list[ApiKeyRow]:
        return self._repo.all()

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
        return ApiKeyRow(current.id, current.label, current.created_at, stamp)

    def rotate(self, key_id: str) -> tuple[ApiKeyRow, ApiKeyRow, str]:
        """A new key with the same label; the old one revoked. Returns (old, new, plaintext)."""
        repo = self._repo
        current = repo.get(key_id)
        if current is None or current.revoked_at is not None:
            raise KeyNotFoundError(f"no active API key with id {key_id!r}")
        new_id, plaintext = generate_key()
        try:
            new_row, stamp = repo.rotate(key_id, new_id, current.label, hash_key(plaintext))
        except LookupError:
            raise KeyNotFoundError(f"API key {key_id} was revoked concurrently") from None
        except sqlite3.Error as exc:  # pragma: no cover - mapped by the writer already
            raise UsageError(str(exc)) from exc
        old = ApiKeyRow(current.id, current.label, current.created_at, stamp)
        return old, new_row, plaintext
