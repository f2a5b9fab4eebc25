"""Login tokens and sessions of the web UI, held in the daemon's memory only.

A login token is printed once by ``flm ui``; it is good for one use within two minutes and is
exchanged for a session whose id (an opaque random string, never a key) travels in an HttpOnly,
SameSite=Strict cookie. Sessions end on logout, after ``IDLE_S`` without a request, or after
``ABSOLUTE_S`` in any case. Both tables are bounded: the oldest entry makes room for a new one.
Only SHA-256 digests of tokens and session ids are kept, so a memory dump holds no usable secret.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LOGIN_TTL_S = 120.0
IDLE_S = 30 * 60.0
ABSOLUTE_S = 12 * 3600.0
MAX_LOGIN_TOKENS = 16
MAX_SESSIONS = 32


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Session:
    csrf: str
    created: float
    last_seen: float
    #: the created key's plaintext is never here: only what the pages need
    data: dict[str, str] = field(default_factory=dict)


class SessionStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logins: dict[str, float] = {}  # digest -> expiry
        self._sessions: dict[str, Session] = {}  # digest -> session

    # --- login tokens ------------------------------------------------------------------------

    def new_login_token(self) -> str:
        self._expire()
        while len(self._logins) >= MAX_LOGIN_TOKENS:
            self._logins.pop(next(iter(self._logins)))
        token = secrets.token_urlsafe(32)
        self._logins[_digest(token)] = self._clock() + LOGIN_TTL_S
        return token

    def redeem(self, token: str) -> tuple[str, Session] | None:
        """A new session for a valid, unused, unexpired token (which is spent), else None."""
        if not token or len(token) > 200:
            return None
        expiry = self._logins.pop(_digest(token), None)
        now = self._clock()
        if expiry is None or expiry < now:
            return None
        self._expire()
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        sid = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), created=now, last_seen=now)
        self._sessions[_digest(sid)] = session
        return sid, session

    # --- sessions ----------------------------------------------------------------------------

    def get(self, sid: str | None) -> Session | None:
        """The live session for ``sid`` (its idle timer restarted), else None."""
        if not sid or len(sid) > 200:
            return None
        key = _digest(sid)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > IDLE_S or now - session.created > ABSOLUTE_S:
            del self._sessions[key]
            return None
        session.last_seen = now
        return session

    def end(self, sid: str | None) -> bool:
        return bool(sid) and self._sessions.pop(_digest(sid or ""), None) is not None

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, exp in self._logins.items() if exp < now]:
            del self._logins[key]
        for key in [
            k
            for k, s in self._sessions.items()
            if now - s.last_seen > IDLE_S or now - s.created > ABSOLUTE_S
        ]:
            del self._sessions[key]

    def live(self) -> bool:
        """A session or an unspent login token exists: the daemon must stay up for it."""
        self._expire()
        return bool(self._sessions or self._logins)
