"""A gateway with an engine emulator behind it, and a raw HTTP client that can pick its
source address (127.0.0.0/8 is all loopback, so each test can have several "clients")."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from flm.testing.emulators import start_emulator
from flm.testing.gateway import Gateway, start_gateway

#: Tests whose loopback source addresses stand for outside clients turn off the loopback
#: exemption from automatic blocks (``ip_blocklist`` section of the policy).
OUTSIDE = {"exempt_loopback": False}


class Env:
    def __init__(self, gw: Gateway, emu: Any, key: str, cli: Any) -> None:
        self.gw = gw
        self.emu = emu
        self.key = key
        self.cli = cli
        self.rt = gw.runtime

    def policy(self, document: dict[str, Any]) -> None:
        self.gw.call(lambda: self.rt.apply_policy(document))

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
        source: str = "127.0.0.1",
        key: str | None = "default",
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(self.gw.url)
        conn = http.client.HTTPConnection(
            parts.hostname, parts.port, timeout=30, source_address=(source, 0)
        )
        hdrs = dict(headers or {})
        if key is not None:
            hdrs.setdefault("Authorization", f"Bearer {self.key if key == 'default' else key}")
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def chat(self, text: str = "hi", **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request(
            "POST",
            "/v1/chat/completions",
            body={"model": "flm://eng/m:1", "messages": [{"role": "user", "content": text}]},
            **kw,
        )


@pytest.fixture
def env(cli: Any) -> Iterator[Env]:
    with start_emulator("vllm", models=["m:1"]) as emu:
        cli("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "eng")
        key = cli("api-keys", "create", "--label", "sec").data["key"]
        with start_gateway() as gw:
            yield Env(gw, emu, key, cli)
