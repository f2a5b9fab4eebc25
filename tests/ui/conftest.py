"""A real FLM daemon serving the web UI (started by ``flm ui --no-browser``), an emulated
Ollama engine, and HTTP over real loopback sockets."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from flm.services.runstate import pid_alive
from tests.conftest import flm_subprocess


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    cookies: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class Ui:
    home: Path
    port: int
    login_url: str

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        host: str | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host or f"127.0.0.1:{self.port}")
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return Reply(
                resp.status,
                {k.lower(): v for k, v in resp.getheaders()},
                data,
                resp.headers.get_all("set-cookie") or [],
            )
        finally:
            conn.close()

    def new_login_url(self) -> str:
        out = flm_subprocess("ui", "--no-browser")
        assert out.returncode == 0, out.stdout + out.stderr
        return str(json.loads(out.stdout)["data"]["url"])

    def login(self, url: str | None = None) -> Session:
        parts = urlsplit(url or self.new_login_url())
        reply = self.request("GET", f"{parts.path}?{parts.query}")
        assert reply.status == 303, reply
        cookie = reply.cookies[0].split(";", 1)[0]
        page = self.request("GET", "/", headers={"Cookie": cookie})
        assert page.status == 200, page.text[:500]
        marker = 'data-csrf="'
        start = page.text.index(marker) + len(marker)
        csrf = page.text[start : page.text.index('"', start)]
        return Session(self, cookie, csrf)


@dataclass
class Session:
    ui: Ui
    cookie: str
    csrf: str

    def get(self, path: str, **headers: str) -> Reply:
        return self.ui.request("GET", path, headers={"Cookie": self.cookie, **headers})

    def post(
        self,
        path: str,
        form: dict[str, str],
        *,
        origin: str | None = "",
        csrf: bool = True,
        accept_json: bool = True,
    ) -> Reply:
        from urllib.parse import urlencode

        data = dict(form)
        if csrf:
            data["csrf"] = self.csrf
        headers = {"Cookie": self.cookie, "Content-Type": "application/x-www-form-urlencoded"}
        if origin is not None:
            headers["Origin"] = origin or self.ui.origin
        if accept_json:
            headers["Accept"] = "application/json"
        return self.ui.request("POST", path, body=urlencode(data).encode(), headers=headers)


def _stop_daemon(home: Path) -> None:
    run_file = home / "run" / "proxy-daemon.json"
    try:
        pid = int(json.loads(run_file.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


@pytest.fixture
def ui(flm_home: Path) -> Iterator[Ui]:
    out = flm_subprocess("ui", "--no-browser")
    assert out.returncode == 0, out.stdout + out.stderr
    url = str(json.loads(out.stdout)["data"]["url"])
    port = int(urlsplit(url).port or 0)
    try:
        yield Ui(flm_home, port, url)
    finally:
        _stop_daemon(flm_home)


@pytest.fixture
def emulator(flm_home: Path) -> Iterator[str]:
    """An emulated Ollama serving ``tiny:1b`` and ``small:3b`` (streaming in several chunks),
    registered as engine ``emu``."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flm.testing.emulate",
            "ollama",
            "--model",
            "tiny:1b",
            "--model",
            "small:3b",
            "--stream-chunks",
            "4",
            "--chunk-interval",
            "0.05",
            "--reply-text",
            "Hello from the emulator",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = json.loads(line)["url"]
        added = flm_subprocess("engines", "add", "--kind", "ollama", "--url", url, "--id", "emu")
        assert added.returncode == 0, added.stdout + added.stderr
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
