"""API key verification on the hot path.

Argon2id stays the storage format. A key is verified with Argon2 once; afterwards it is
recognised through an in-memory map keyed by BLAKE2b keyed with a process secret, so the hot
path costs one keyed hash and a constant-time digest comparison. Revocation drops the entry at
once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable

from flm.core.keys import parse_key

#: Bounded memory for keys seen to be wrong (so repeating one costs no Argon2).
NEGATIVE_CACHE = 4096


class KeyVerifier:
    def __init__(self, lookup_hash: Callable[[str], str | None],
                 verify_hash: Callable[[str, str], bool]) -> None:
        self._lookup = lookup_hash
        self._verify = verify_hash
        self._secret = secrets.token_bytes(32)
        self._valid: dict[bytes, tuple[bytes, str]] = {}
        self._invalid: OrderedDict[bytes, None] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[str | None]] = {}

    def _digest(self, presented: str) -> bytes:
        # Keyed BLAKE2b: a MAC in one C call (the hmac module's wrapper costs more per request).
        return hashlib.blake2b(presented.encode(), key=self._secret, digest_size=32).digest()

    def check_cached(self, presented: str) -> tuple[bytes, str | None, bool]:
        """(digest, key id if known valid, known invalid)."""
        digest = self._digest(presented)
        hit = self._valid.get(digest)
        if hit is not None and hmac.compare_digest(hit[0], digest):
            return digest, hit[1], False
        return digest, None, digest in self._invalid

    async def verify(self, presented: str) -> str | None:
        """The key id when ``presented`` is an active key, else ``None``."""
        digest, key_id, known_bad = self.check_cached(presented)
        if key_id is not None:
            return key_id
        if known_bad:
            return None
        parsed = parse_key(presented)
        if parsed is None:
            self._remember_bad(digest)
            return None
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            stored = await asyncio.to_thread(self._lookup, parsed.key_id)
            ok = stored is not None and await asyncio.to_thread(self._verify, stored, presented)
            result = parsed.key_id if ok else None
            if result is None:
                self._remember_bad(digest)
            else:
                self._valid[digest] = (digest, parsed.key_id)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved
            raise
        finally:
            del self._pending[digest]

    def _remember_bad(self, digest: bytes) -> None:
        self._invalid[digest] = None
        if len(self._invalid) > NEGATIVE_CACHE:
            self._invalid.popitem(last=False)

    def retain_only(self, active_ids: set[str]) -> int:
        """Drop cached keys that are no longer active (revoked, rotated away, restored)."""
        dropped = [d for d, (_, kid) in self._valid.items() if kid not in active_ids]
        for d in dropped:
            del self._valid[d]
        self._invalid.clear()
        return len(dropped)

    def invalidate(self, key_id: str) -> None:
        for d in [d for d, (_, kid) in self._valid.items() if kid == key_id]:
            del self._valid[d]
