"""The HTTP-01 challenge store: ``{token: key_authorization}``, shared between threads.

The ACME client (running in a worker thread) puts a token in while an order is being validated;
FLM's plain-HTTP port answers ``GET /.well-known/acme-challenge/{token}`` from it with the key
authorization as ``text/plain``. Nothing here touches the network or imports the ACME library, so
the gateway can import it for free.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, MutableMapping

#: Path prefix an ACME CA fetches HTTP-01 answers from (RFC 8555 §8.3).
ACME_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"

# Tokens are base64url without padding (RFC 8555 §8.1: at least 128 bits of entropy).
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}")


def is_valid_token(token: str) -> bool:
    return _TOKEN.fullmatch(token) is not None


class ChallengeStore(MutableMapping[str, str]):
    """A small thread-safe dict of pending HTTP-01 answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, str] = {}

    def __getitem__(self, token: str) -> str:
        with self._lock:
            return self._data[token]

    def __setitem__(self, token: str, key_authorization: str) -> None:
        if not is_valid_token(token):
            raise ValueError("not an ACME challenge token")
        with self._lock:
            self._data[token] = key_authorization

    def __delitem__(self, token: str) -> None:
        with self._lock:
            del self._data[token]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._data))

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def response_for_path(self, path: str) -> str | None:
        """The body to serve for a request path, or ``None`` (→ 404) for anything else."""
        if not path.startswith(ACME_CHALLENGE_PREFIX):
            return None
        token = path[len(ACME_CHALLENGE_PREFIX) :]
        if not is_valid_token(token):
            return None
        with self._lock:
            return self._data.get(token)
