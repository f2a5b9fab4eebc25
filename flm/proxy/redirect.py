"""The plain-HTTP port of a TLS proxy: 301 to HTTPS with HSTS, and (``https-acme``) the HTTP-01
challenge answers. Nothing else is served there: no API, no key ever travels in clear text.
The security headers of every response come from its server (``response_headers()``)."""

from __future__ import annotations

import re

from flm.proxy.asgi import Receive, Scope, Send
from flm.proxy.middleware.request import HSTS
from flm.tls.challenge import ACME_CHALLENGE_PREFIX, ChallengeStore

# A host name, an IPv4 address or a bracketed IPv6 address, optionally with a port.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::[0-9]{1,5})?$")


class RedirectApp:
    """``http://host:port/p?q`` → ``301 https://host:https_port/p?q`` (+ HSTS).

    The host comes from the request's ``Host`` header when it is a plain host name or address
    (anything else falls back to ``default_host``), so a LAN client is sent to the address it
    used. With a ``challenges`` store, ``/.well-known/acme-challenge/<token>`` answers the key
    authorization (``text/plain``) or 404.
    """

    def __init__(
        self,
        https_port: int,
        default_host: str = "localhost",
        challenges: ChallengeStore | None = None,
    ) -> None:
        self.https_port = https_port
        self.default_host = default_host
        self.challenges = challenges

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope.get("path") or "/"
        if self.challenges is not None and path.startswith(ACME_CHALLENGE_PREFIX):
            answer = self.challenges.response_for_path(path)
            if answer is None:
                await self._plain(send, 404, b"not found\n")
            else:
                await self._plain(send, 200, answer.encode("ascii"))
            return
        location = self.location(scope)
        body = f"moved to {location}\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 301,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                    HSTS,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def location(self, scope: Scope) -> str:
        host = self.default_host
        for name, value in scope.get("headers") or ():
            if name == b"host":
                text = value.decode("latin-1").strip()
                match = _HOST.match(text)
                if match:
                    host = match.group(1)
                break
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        raw: bytes = scope.get("raw_path") or scope.get("path", "/").encode()
        target = raw.decode("latin-1")
        if not target.startswith("/"):
            target = "/" + target
        query: bytes = scope.get("query_string") or b""
        if query:
            target += "?" + query.decode("latin-1")
        return f"https://{host}:{self.https_port}{target}"

    @staticmethod
    async def _plain(send: Send, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
