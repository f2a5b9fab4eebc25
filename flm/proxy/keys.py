"""API key verification on the hot path.

Argon2id stays the storage format. A key is verified with Argon2 once; afterwards it is
recognised through an in-memory map keyed by BLAKE2b keyed with a process secret, so the hot
path costs one keyed hash and a constant-time digest comparison. Revocation drops the entry at
once.

Argon2 on demand is bounded: verifies run on a small pool of their own (never the default
executor the rest of the proxy uses), and a verify is admitted, counted, before it runs: at
most :data:`PER_ADDRESS` at once per client address and :data:`MAX_ADMITTED` in all (running
and waiting); beyond that :class:`VerifyBusy` refuses at once. A key whose id does not exist
costs one Argon2 verify against a dummy hash, as much as a wrong secret for an id that does:
the answer time does not tell which ids exist. Keys found wrong are remembered (by keyed
digest) across reloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from flm.core.key_format import parse_key

#: Bounded memory for keys seen to be wrong (so repeating one costs no Argon2).
NEGATIVE_CACHE = 4096
#: Argon2 verifies running at once (each takes ~90 ms of CPU and 64 MiB).
VERIFY_WORKERS = 2
#: Verifies admitted at once (running and waiting), over all clients.
MAX_ADMITTED = 16
#: Verifies admitted at once for one client address.
PER_ADDRESS = 2


class VerifyBusy(Exception):
    """No verify slot: for this address (``per_address``) or for anyone."""

    def __init__(self, per_address: bool) -> None:
        super().__init__("per-address" if per_address else "total")
        self.per_address = per_address


class KeyVerifier:
    def __init__(
        self,
        lookup_hash: Callable[[str], str | None],
        verify_hash: Callable[[str, str], bool],
        dummy_hash: Callable[[], str] | None = None,
        *,
        workers: int = VERIFY_WORKERS,
        max_admitted: int = MAX_ADMITTED,
        per_address: int = PER_ADDRESS,
    ) -> None:
        self._lookup = lookup_hash
        #: where an id unknown to ``lookup_hash`` is looked up next (the shared state
        #: backend: a key created through another process), on the verify pool
        self.fallback: Callable[[str], str | None] | None = None
        self._verify = verify_hash
        self._secret = secrets.token_bytes(32)
        self._valid: dict[bytes, tuple[bytes, str]] = {}
        #: digest → the key id when that id did not exist at the verify (it may be created
        #: or restored later: the entry goes then), else None (wrong for good)
        self._invalid: OrderedDict[bytes, str | None] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[str | None]] = {}
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="flm-argon2")
        self.max_admitted = max_admitted
        self.per_address = per_address
        #: verifies admitted and not yet finished, in all and per client address
        self.admitted = 0
        self._by_address: dict[str, int] = {}
        self._dummy: Future[str] | None = (
            self._pool.submit(dummy_hash) if dummy_hash is not None else None
        )

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

    async def verify(self, presented: str, client: str = "") -> str | None:
        """The key id when ``presented`` is an active key, else ``None``; ``VerifyBusy``
        when ``client`` (an address) or everyone already has all the verify slots."""
        digest, key_id, known_bad = self.check_cached(presented)
        if key_id is not None:
            return key_id
        if known_bad:
            return None
        parsed = parse_key(presented)
        if parsed is None:
            self._remember_bad(digest, None)
            return None
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        # admitted (counted) before it runs, refused at once when the slots are taken
        held = self._by_address.get(client, 0)
        if held >= self.per_address:
            raise VerifyBusy(True)
        if self.admitted >= self.max_admitted:
            raise VerifyBusy(False)
        self.admitted += 1
        self._by_address[client] = held + 1
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            ok, existed = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._check, parsed.key_id, presented
            )
            result = parsed.key_id if ok else None
            if result is None:
                self._remember_bad(digest, None if existed else parsed.key_id)
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
            self.admitted -= 1
            left = self._by_address[client] - 1
            if left:
                self._by_address[client] = left
            else:
                del self._by_address[client]

    def _check(self, key_id: str, presented: str) -> tuple[bool, bool]:
        """(valid, the id exists), on the verify pool. An unknown id costs one verify
        against the dummy hash, like a wrong secret for a known one."""
        stored = self._lookup(key_id)
        if stored is None and self.fallback is not None:
            stored = self.fallback(key_id)
        if stored is None:
            if self._dummy is not None:
                self._verify(self._dummy.result(), presented)
            return False, False
        return self._verify(stored, presented), True

    def _remember_bad(self, digest: bytes, unknown_id: str | None) -> None:
        self._invalid[digest] = unknown_id
        if len(self._invalid) > NEGATIVE_CACHE:
            self._invalid.popitem(last=False)

    def retain_only(self, active_ids: set[str]) -> int:
        """Drop cached keys that are no longer active (revoked, rotated away, restored). Keys
        known to be wrong stay known (a key id's hash never changes), but for ids that did
        not exist when they were tried and exist now."""
        dropped = [d for d, (_, kid) in self._valid.items() if kid not in active_ids]
        for d in dropped:
            del self._valid[d]
        for d in [d for d, kid in self._invalid.items() if kid is not None and kid in active_ids]:
            del self._invalid[d]
        return len(dropped)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def invalidate(self, key_id: str) -> None:
        for d in [d for d, (_, kid) in self._valid.items() if kid == key_id]:
            del self._valid[d]
