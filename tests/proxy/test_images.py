"""Image URLs fetched by the gateway: https only, redirects checked hop by hop, public
addresses only (the fetch must not reach into the machine's own network)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme

from flm.openai.errors import HttpError
from flm.proxy.images import fetch_image, is_public
from flm.testing.emulators import ModelSpec, start_emulator
from flm.testing.gateway import start_gateway
from tests.proxy.test_gateway import _request

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


class Servers:
    """An https image host on 127.0.0.1 (certificate from a test CA) and a plain http one
    standing for an internal service."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.seen_tls: list[str] = []
        self.seen_plain: list[str] = []
        self.plain = self._serve(self.seen_plain, None)
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.tls = self._serve(self.seen_tls, ctx)
        self.port = int(self.tls.server_address[1])
        self.plain_port = int(self.plain.server_address[1])

    def _serve(self, seen: list[str], ctx: ssl.SSLContext | None) -> ThreadingHTTPServer:
        servers = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                if self.path == "/cat.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    self.wfile.write(PNG)
                    return
                target = {
                    "/to-http": f"http://127.0.0.1:{servers.plain_port}/secret.png",
                    "/to-other": f"https://127.0.0.2:{servers.port}/cat.png",
                    "/loop": "/loop",
                    "/to-cat": "/cat.png",
                }.get(self.path)
                if target is None:
                    self.send_error(404)
                    return
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if ctx is not None:
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def close(self) -> None:
        for server in (self.tls, self.plain):
            server.shutdown()
            server.server_close()


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.close()


def _only_first_loopback(address: Any) -> bool:
    return bool(address == ipaddress.ip_address("127.0.0.1"))


def _fetch(servers: Servers, path: str, host: str = "127.0.0.1") -> str:
    return asyncio.run(
        fetch_image(
            f"https://{host}:{servers.port}{path}",
            allowed=_only_first_loopback,
            ssl_context=servers.client_context(),
        )
    )


#: (address, public?): the SSRF rule of image URL fetches, with the forms that hide an
#: internal IPv4 address inside an IPv6 one.
ADDRESSES = [
    ("8.8.8.8", True),
    ("1.1.1.1", True),
    ("2001:4860:4860::8888", True),
    ("127.0.0.1", False),
    ("10.1.2.3", False),
    ("172.16.0.1", False),
    ("192.168.1.1", False),
    ("169.254.169.254", False),
    ("100.64.0.1", False),
    ("0.0.0.0", False),
    ("::1", False),
    ("fd00::1", False),
    ("fe80::1", False),
    ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False),
    ("224.0.0.1", False),
    # IPv6 forms that embed an IPv4 address are judged by it (NAT64, IPv4-compatible, 6to4)
    ("64:ff9b::a9fe:a9fe", False),
    ("64:ff9b::7f00:1", False),
    ("64:ff9b::a00:1", False),
    ("::127.0.0.1", False),
    ("::8.8.8.8", False),
    ("2002:7f00:1::1", False),
    ("2002:a9fe:a9fe::1", False),
    ("2002:c0a8:101::1", False),
    ("fec0::1", False),
    ("feff::1", False),
    ("64:ff9b:1::808:808", False),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),
    ("64:ff9b::808:808", True),
    ("2002:808:808::1", True),
]


@pytest.mark.parametrize(("text", "public"), ADDRESSES)
def test_which_addresses_are_public(text: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(text)) is public


def test_redirects_are_checked_hop_by_hop(servers: Servers) -> None:
    uri = _fetch(servers, "/to-cat")  # an allowed https hop is followed
    assert uri == "data:image/png;base64," + base64.b64encode(PNG).decode()

    with pytest.raises(HttpError) as err:
        _fetch(servers, "/to-http")
    assert err.value.status == 400 and "https" in err.value.message
    assert servers.seen_plain == []  # the internal http service never saw a request

    with pytest.raises(HttpError) as err:
        _fetch(servers, "/to-other")
    assert "not a public address" in err.value.message

    with pytest.raises(HttpError) as err:
        _fetch(servers, "/loop")
    assert "redirected more than 3 times" in err.value.message
    assert servers.seen_tls.count("/loop") == 4


def test_names_are_checked_when_resolved(servers: Servers) -> None:
    before = len(servers.seen_tls)
    with pytest.raises(HttpError) as err:
        asyncio.run(
            fetch_image(
                f"https://localhost:{servers.port}/cat.png",
                allowed=lambda _a: False,
                ssl_context=servers.client_context(),
            )
        )
    assert "not a public address" in err.value.message
    assert len(servers.seen_tls) == before


def test_connection_failures_read_alike(servers: Servers) -> None:
    """Closed port, TLS on a plain port: one message, no detail to scan ports with."""
    messages = set()
    for url in (f"https://127.0.0.1:{servers.plain_port}/x.png", "https://127.0.0.1:9/x.png"):
        with pytest.raises(HttpError) as err:
            asyncio.run(
                fetch_image(url, allowed=_only_first_loopback, ssl_context=servers.client_context())
            )
        messages.add(err.value.message)
    assert messages == {"cannot fetch image URL: no connection to its host"}


def test_gateway_refuses_image_urls_on_this_machine(cli: Any, servers: Servers) -> None:
    with start_emulator("ollama", models=[ModelSpec("see:v1", vision=True)]) as emu:
        cli("engines", "add", "--kind", "ollama", "--url", emu.url, "--id", "eng")
        key = cli("api-keys", "create", "--label", "t").data["key"]
        with start_gateway() as gw:
            for host in ("127.0.0.1", "localhost"):
                body = json.dumps(
                    {
                        "model": "flm://eng/see:v1",
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "text", "text": "what is this"},
                                    {
                                        "type": "image_url",
                                        "image_url": {
                                            "url": f"https://{host}:{servers.port}/cat.png"
                                        },
                                    },
                                ],
                            }
                        ],
                    }
                ).encode()
                status, _, raw = _request(
                    gw.url,
                    "POST",
                    "/v1/chat/completions",
                    body,
                    {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                )
                assert status == 400, raw
                assert "not a public address" in json.loads(raw)["error"]["message"]
            # ... nor by an IPv6 form that carries a loopback or link-local IPv4 address
            for host in (
                "[64:ff9b::7f00:1]",
                "[::127.0.0.1]",
                "[2002:7f00:1::1]",
                "[64:ff9b::a9fe:a9fe]",
                "[fec0::1]",
            ):
                body = json.dumps(
                    {
                        "model": "flm://eng/see:v1",
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {
                                        "type": "image_url",
                                        "image_url": {
                                            "url": f"https://{host}:{servers.port}/cat.png"
                                        },
                                    }
                                ],
                            }
                        ],
                    }
                ).encode()
                status, _, raw = _request(
                    gw.url,
                    "POST",
                    "/v1/chat/completions",
                    body,
                    {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                )
                assert status == 400, raw
                assert "not a public address" in json.loads(raw)["error"]["message"], host
        assert servers.seen_tls == []
        assert not any(path == "/api/chat" for _m, path in emu.requests)
