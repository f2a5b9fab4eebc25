"""Egress through the real CLI and daemon (issue 6, SPEC §7), with microsocks on loopback.

The "remote" engine listens on this machine but is registered under the machine's host name,
which is not a loopback *literal*: FLM treats it as remote, so its traffic must go through the
SOCKS server (with remote DNS), while an engine registered as ``127.0.0.1`` never does. How we
know which way a request went: the engine looks up which process owns the peer socket of every
request while the connection is open (microsocks or the FLM daemon) and, in the SOCKS test,
refuses anything that did not come from microsocks; microsocks's own log names each target.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme
from aiohttp import web

from flm.egress.config import is_loopback_target
from flm.testing.emulators import (
    Emulator,
    EmulatorServer,
    Handler,
    LmStudioEmulator,
    ModelSpec,
    VllmEmulator,
    expected_reply,
)
from tests.conftest import flm_subprocess

from ..tls.support import free_port, wait_until
from .conftest import Socks

PNG = base64.b64decode("iVBORw0KGgo=")


@pytest.fixture(scope="module")
def remote_name() -> tuple[str, str]:
    """This machine's host name (not a loopback literal) and the IPv4 address it resolves to."""
    name = socket.gethostname()
    try:
        address = str(socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except OSError as exc:
        pytest.fail(f"the host name {name!r} does not resolve ({exc}); these tests need it")
    assert not is_loopback_target(name), name
    return name, address


# --- who connected? ----------------------------------------------------------------------------


@dataclass
class Watch:
    """Owners (pids) of the sockets that connected to a server, among ``pids``."""

    pids: list[int] = field(default_factory=list)
    owners: list[int | None] = field(default_factory=list)
    #: When set, connections owned by another process are refused with 403.
    only: int | None = None

    def owner_of(self, ip: str, port: int) -> int | None:
        for pid in self.pids:
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(c.laddr and (c.laddr.ip, c.laddr.port) == (ip, port) for c in conns):
                return pid
        return None


def watched(kind: type[EmulatorServer], models: list[Any], watch: Watch) -> Emulator:
    """An emulator of ``kind`` noting which process each request came from (not started)."""

    class Watched(kind):  # type: ignore[valid-type,misc]
        def build_app(self) -> web.Application:
            app: web.Application = super().build_app()
            app.middlewares.insert(0, self._who)
            return app

        @web.middleware
        async def _who(self, request: web.Request, handler: Handler) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            assert peer is not None
            owner = await asyncio.to_thread(watch.owner_of, peer[0], peer[1])
            watch.owners.append(owner)
            if watch.only is not None and owner != watch.only:
                return web.Response(status=403, text="reachable only through the SOCKS server")
            return await handler(request)

    return Emulator(Watched(models))


@contextmanager
def image_server(host: str, bind: str, watch: Watch) -> Iterator[tuple[int, Path]]:
    """HTTPS on ``bind`` serving a PNG, with a certificate for ``host``; yields (port, CA file)."""
    ca = trustme.CA()
    cert = ca.issue_cert(host)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            owner = watch.owner_of(*self.client_address[:2])
            watch.owners.append(owner)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((bind, 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with _tmp_file(ca.cert_pem.bytes()) as ca_file:
            yield int(server.server_address[1]), ca_file
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def _tmp_file(data: bytes) -> Iterator[Path]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pem") as fh:
        fh.write(data)
        fh.flush()
        yield Path(fh.name)


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def proxies(cli: Any) -> Iterator[None]:
    try:
        yield
    finally:
        cli("proxy", "stop", "--all")


def _daemon_pid(flm_home: Path) -> int:
    return int(json.loads((flm_home / "run" / "proxy-daemon.json").read_text())["pid"])


def _chat(port: int, key: str, model: str, content: Any) -> tuple[int, dict[str, Any]]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(
                {"model": model, "messages": [{"role": "user", "content": content}]}
            ).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _reply(port: int, key: str, model: str, content: Any) -> str:
    status, body = _chat(port, key, model, content)
    assert status == 200, body
    return str(body["choices"][0]["message"]["content"])


def _events(flm_home: Path, event_type: str) -> list[tuple[str, dict[str, Any]]]:
    with sqlite3.connect(flm_home / "security.db") as db:
        rows = db.execute(
            "SELECT severity, details_json FROM audit_logs WHERE event_type=? ORDER BY id",
            (event_type,),
        ).fetchall()
    return [(severity, json.loads(details)) for severity, details in rows]


def _wait_daemon_gone(flm_home: Path) -> None:
    wait_until(
        lambda: not (flm_home / "run" / "proxy-daemon.json").exists(),
        timeout=10,
        what="the daemon of a refused start to exit",
    )


def _free_port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


# --- tests -------------------------------------------------------------------------------------


def test_remote_engine_and_image_urls_go_through_socks_loopback_engine_never(
    cli: Any,
    proxies: None,
    socks: Socks,
    remote_name: tuple[str, str],
    flm_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, address = remote_name
    remote_watch, local_watch, image_watch = Watch(), Watch(), Watch()
    models = ["chat-model:1b", ModelSpec("see:v1", vision=True)]
    with (
        watched(LmStudioEmulator, models, remote_watch).start(address) as remote,
        watched(VllmEmulator, ["chat-model:1b"], local_watch).start("127.0.0.1") as local,
        image_server(name, address, image_watch) as (image_port, image_ca),
    ):
        remote_port = int(remote.url.rsplit(":", 1)[1])
        local_port = int(local.url.rsplit(":", 1)[1])
        assert (
            cli(
                "engines",
                "add",
                "--kind",
                "lmstudio",
                "--url",
                f"http://{name}:{remote_port}",
                "--id",
                "remote",
            ).code
            == 0
        )
        assert (
            cli("engines", "add", "--kind", "vllm", "--url", local.url, "--id", "local").code == 0
        )
        key = cli("api-keys", "create", "--label", "egress").data["key"]
        monkeypatch.setenv("SSL_CERT_FILE", str(image_ca))  # the daemon trusts the image host
        port = free_port()
        started = flm_subprocess(
            "proxy",
            "start",
            "--port",
            str(port),
            "--egress-mode",
            "socks5",
            "--socks5-endpoint",
            socks.endpoint,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        egress = json.loads(started.stdout)["data"]["egress"]
        assert egress["mode"] == "socks5" and egress["socks5_endpoint"] == socks.endpoint
        assert egress["probe"]["reachable"] and not egress["fell_back"]
        daemon = _daemon_pid(flm_home)
        for watch in (remote_watch, local_watch, image_watch):
            watch.pids = [socks.process.pid, daemon]
        remote_watch.only = socks.process.pid  # reachable only through the SOCKS server

        assert _reply(port, key, "flm://remote/chat-model:1b", "far away") == expected_reply(
            "far away"
        )
        image_url = f"https://{name}:{image_port}/cat.png"
        assert _reply(
            port,
            key,
            "flm://remote/see:v1",
            [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": image_url}},
            ],
        ) == expected_reply("what is this", images=1)
        assert _reply(port, key, "flm://local/chat-model:1b", "close by") == expected_reply(
            "close by"
        )

        status = cli("proxy", "status").data["proxies"][0]
        assert status["egress"]["mode"] == "socks5"

    assert remote_watch.owners and set(remote_watch.owners) == {socks.process.pid}
    assert image_watch.owners == [socks.process.pid]
    assert local_watch.owners and set(local_watch.owners) == {daemon}
    log = socks.log()
    # microsocks was asked for the host *name* (remote DNS), never for the loopback engine.
    assert f"connected to {name}:{remote_port}" in log
    assert f"connected to {name}:{image_port}" in log
    assert f":{local_port}" not in log


def test_socks_down_and_fail_closed_refuses_the_start_with_an_audit_event(
    proxies: None, flm_home: Path
) -> None:
    port, dead = free_port(), free_port()
    result = flm_subprocess(
        "proxy",
        "start",
        "--port",
        str(port),
        "--egress-mode",
        "socks5",
        "--socks5-endpoint",
        f"127.0.0.1:{dead}",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "PROXY_INVALID_CONFIG"
    assert "unreachable after 3 tries" in error["message"]
    assert "--egress-fail-open" in error["message"]
    _wait_daemon_gone(flm_home)
    assert _free_port_closed(port)
    [(severity, details)] = _events(flm_home, "egress_unreachable")
    assert severity == "high" and details["action"] == "start_refused"
    assert details["endpoint"] == f"127.0.0.1:{dead}" and details["mode"] == "socks5"
    assert details["probe"]["attempts"] == 3 and not details["probe"]["reachable"]

    # Tor down: the same refusal, and tor_unreachable recorded too.
    result = flm_subprocess(
        "proxy",
        "start",
        "--port",
        str(port),
        "--egress-mode",
        "tor",
        "--socks5-endpoint",
        f"127.0.0.1:{dead}",
    )
    assert result.returncode == 1 and "start Tor" in json.loads(result.stdout)["error"]["message"]
    _wait_daemon_gone(flm_home)
    [(severity, details)] = _events(flm_home, "tor_unreachable")
    assert severity == "high" and details["endpoint"] == f"127.0.0.1:{dead}"
    assert len(_events(flm_home, "egress_unreachable")) == 2


def test_socks_down_and_fail_open_goes_direct_with_an_audit_event(
    cli: Any, proxies: None, remote_name: tuple[str, str], flm_home: Path
) -> None:
    name, address = remote_name
    watch = Watch()
    with watched(VllmEmulator, ["chat-model:1b"], watch).start(address) as remote:
        remote_port = int(remote.url.rsplit(":", 1)[1])
        assert (
            cli(
                "engines",
                "add",
                "--kind",
                "vllm",
                "--url",
                f"http://{name}:{remote_port}",
                "--id",
                "remote",
            ).code
            == 0
        )
        key = cli("api-keys", "create", "--label", "egress").data["key"]
        port, dead = free_port(), free_port()
        started_at = time.monotonic()
        result = flm_subprocess(
            "proxy",
            "start",
            "--port",
            str(port),
            "--egress-mode",
            "socks5",
            "--socks5-endpoint",
            f"127.0.0.1:{dead}",
            "--egress-fail-open",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert time.monotonic() - started_at < 5  # three quick probes, then direct
        data = json.loads(result.stdout)["data"]
        assert data["egress"]["mode"] == "direct" and data["egress"]["fell_back"]
        assert data["egress"]["requested_mode"] == "socks5"
        assert any("using direct connections" in note for note in data["notes"])
        daemon = _daemon_pid(flm_home)
        watch.pids = [daemon]
        assert _reply(port, key, "flm://remote/chat-model:1b", "direct now") == expected_reply(
            "direct now"
        )
        status = cli("proxy", "status").data["proxies"][0]
        assert status["egress"]["mode"] == "direct" and status["egress"]["fell_back"]
    assert watch.owners and set(watch.owners) == {daemon}
    [(severity, details)] = _events(flm_home, "egress_fail_open_triggered")
    assert severity == "high" and details["endpoint"] == f"127.0.0.1:{dead}"
    assert details["mode"] == "socks5"


def test_acme_orders_go_through_the_socks_proxy(
    cli: Any,
    proxies: None,
    socks: Socks,
    remote_name: tuple[str, str],
    flm_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ACME CA, reached by host name, sees FLM's requests arrive from microsocks."""
    from ..tls.support import free_port_pair, run_pebble

    name, address = remote_name
    port = free_port_pair()
    with run_pebble(tmp_path / "pebble", http_port=port, host=name, listen=address) as pebble:
        acme_port = int(pebble.directory_url.rsplit(":", 1)[1].split("/", 1)[0])
        monkeypatch.setenv("FLM_ACME_DIRECTORY", pebble.directory_url)
        monkeypatch.setenv("FLM_ACME_CA_BUNDLE", str(pebble.ca_bundle))
        result = flm_subprocess(
            "proxy",
            "start",
            "--mode",
            "https-acme",
            "--port",
            str(port),
            "--acme-domain",
            "localhost",
            "--acme-email",
            "a@flm.test",
            "--egress-mode",
            "socks5",
            "--socks5-endpoint",
            socks.endpoint,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        data = json.loads(result.stdout)["data"]
        assert data["certificate"]["source"] == "issued"
        assert data["egress"]["mode"] == "socks5"
        renewed = cli("proxy", "renew", "--port", str(port))
        assert renewed.code == 0 and renewed.data["renewed"][0]["renewed"], renewed.out
    assert socks.log().count(f"connected to {name}:{acme_port}") >= 2
