"""API key format: ``flm_<id>_<secret>`` — pure functions, no hashing here."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

PREFIX = "flm"
ID_BYTES = 8
SECRET_BYTES = 32

_KEY = re.compile(r"^flm_([0-9a-f]{16})_([A-Za-z0-9_-]{43,128})$")


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    secret: str


def generate_key() -> tuple[str, str]:
    """A new ``(key_id, plaintext)``; the secret carries 256 random bits, URL-safe."""
    key_id = secrets.token_hex(ID_BYTES)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return key_id, f"{PREFIX}_{key_id}_{secret}"


def parse_key(plaintext: str) -> ParsedKey | None:
    """Split a presented key into id and secret, or ``None`` when it is not FLM-shaped."""
    match = _KEY.match(plaintext)
    if match is None:
        return None
    return ParsedKey(match[1], match[2])
