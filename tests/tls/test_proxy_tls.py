"""The TLS modes through the real CLI and daemon, over real sockets on loopback (issue 6).

- ``dev-selfsigned``: HTTPS on port+1 that a client trusting only FLM's root accepts, a chat
  reply through it, the HTTP port answering only 301 + HSTS, an untrusting client refused;
- ``packaged-ca``: chains to the local root, reused across restarts, re-issued once expired;
  ``install-ca`` / ``uninstall-ca`` against the real Linux trust store, checked with ``curl``;
- ``https-acme`` against Pebble: HTTP-01 issuance served, a forced renewal swapped in under a
  running stream, five issuances in a row, and the fallback chain with Pebble stopped;
- the TLS policy (1.2+ only, AEAD ciphers) and 0600 keys.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from flm.testing.emulators import Behaviour, Emulator, expected_reply, start_emulator
from flm.tls.context import TLS12_CIPHERS
from flm.tls.issue import default_server_hosts, ensure_local_ca, ensure_server_cert
from tests.conftest import flm_subprocess
from tests.support import curl_with_system_trust, require_real_trust_store

from .support import (
    Pebble,
    TlsConnection,
    free_port_pair,
    http_get,
    https_call,
    peer_fingerprint,
    port_is_closed,
    require_tool,
    run_pebble,
)

MODEL = "flm://eng/chat-model:1b"


@dataclass
class Engine:
    emu: Emulator
    key: str


@pytest.fixture
def engine(cli: Any) -> Iterator[Engine]:
    """A vLLM emulator registered as engine ``eng``, and an API key."""
    with start_emulator("vllm", models=["chat-model:1b"]) as emu:
        assert cli("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "eng").code == 0
        key = cli("api-keys", "create", "--label", "tls-tests").data["key"]
        yield Engine(emu, key)


@pytest.fixture
def proxies(cli: Any) -> Iterator[None]:
    """Stops every proxy (and so the daemon) a test started, whatever happened."""
    try:
        yield
    finally:
        cli("proxy", "stop", "--all")


def start_proxy(*args: str) -> dict[str, Any]:
    """``flm proxy start ARGS`` in a child process (it spawns the daemon), which must succeed."""
    result = flm_subprocess("proxy", "start", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout)["data"]
    return data


def _start(cli: Any, mode: str, port: int, *extra: str) -> dict[str, Any]:
    return start_proxy("--mode", mode, "--port", str(port), *extra)


def _root_ctx(path: str | Path) -> ssl.SSLContext:
    """A client that trusts exactly one root (no system store)."""
    return ssl.create_default_context(cafile=str(path))


def _chat(port: int, ctx: ssl.SSLContext, key: str, text: str) -> str:
    status, _, body, _ = https_call(
        port,
        ctx,
        "POST",
        "/v1/chat/completions",
        key=key,
        body={"model": MODEL, "messages": [{"role": "user", "content": text}]},
    )
    assert status == 200, body
    return str(json.loads(body)["choices"][0]["message"]["content"])


def _status(cli: Any) -> dict[str, Any]:
    proxies: list[dict[str, Any]] = cli("proxy", "status").data["proxies"]
    assert len(proxies) == 1, proxies
    return proxies[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_private_keys(certs: Path) -> None:
    keys = [p for p in certs.rglob("*.pem") if "key" in p.name]
    assert keys, f"no key files under {certs}"
    for key in keys:
        assert _mode(key) == 0o600, key
    for directory in [certs, *(p for p in certs.rglob("*") if p.is_dir())]:
        assert _mode(directory) == 0o700, directory


# --- dev-selfsigned --------------------------------------------------------------------------


def test_dev_selfsigned_https_on_port_plus_one_and_redirect(
    cli: Any, engine: Engine, proxies: None, flm_home: Path
) -> None:
    port = free_port_pair()
    started = time.monotonic()
    data = _start(cli, "dev-selfsigned", port)
    startup_s = time.monotonic() - started
    assert startup_s < 3.0, f"dev-selfsigned took {startup_s:.2f} s to start"
    https_port = port + 1
    assert data["https_port"] == https_port
    assert data["endpoints"] == [f"https://localhost:{https_port}"]
    root = flm_home / "certs" / "dev-selfsigned" / "ca.pem"
    assert data["trust"]["root_ca"] == str(root)
    assert data["trust"]["trust"] == f"flm security install-ca --cert-path {root}"
    assert data["trust"]["untrust"] == f"flm security uninstall-ca --cert-path {root}"

    # A client trusting only the generated root: handshake on port+1 and a chat reply.
    ctx = _root_ctx(root)
    assert _chat(https_port, ctx, engine.key, "hello over tls") == expected_reply("hello over tls")
    status, headers, _, fingerprint = https_call(
        https_port, ctx, "GET", "/v1/models", key=engine.key
    )
    assert status == 200 and fingerprint == data["certificate"]["fingerprint_sha256"]
    assert headers["strict-transport-security"].startswith("max-age=")
    # The certificate names 127.0.0.1 too.
    assert (
        https_call(https_port, ctx, "GET", "/v1/models", key=engine.key, server_name="127.0.0.1")[0]
        == 200
    )

    # The HTTP port: only 301 to the same path on HTTPS, with HSTS; the API is not there.
    status, headers, _ = http_get(port, "/v1/chat/completions?x=1", host=f"localhost:{port}")
    assert status == 301
    assert headers["location"] == f"https://localhost:{https_port}/v1/chat/completions?x=1"
    assert headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
    assert headers["x-content-type-options"] == "nosniff" and headers["x-flm-proxy"] == "1"
    status, headers, _ = http_get(port, "/v1/models")  # Host 127.0.0.1:port
    assert status == 301 and headers["location"] == f"https://127.0.0.1:{https_port}/v1/models"

    # A client that does not trust the root fails verification.
    with pytest.raises(ssl.SSLCertVerificationError):
        https_call(https_port, ssl.create_default_context(), "GET", "/v1/models")

    status_now = _status(cli)
    assert status_now["https_port"] == https_port and status_now["last_error"] is None
    assert status_now["certificate_expiry"] == data["certificate"]["not_after"]
    assert status_now["egress"]["mode"] == "direct"
    _assert_private_keys(flm_home / "certs")


def test_tls_policy_12_and_13_only_with_aead_ciphers(
    cli: Any, proxies: None, flm_home: Path
) -> None:
    port = free_port_pair()
    _start(cli, "dev-selfsigned", port)
    https_port = port + 1
    root = flm_home / "certs" / "dev-selfsigned" / "ca.pem"

    def handshake(ctx: ssl.SSLContext) -> tuple[str, str]:
        conn = TlsConnection(https_port, ctx)
        try:
            conn.connect()
            version, cipher = conn.tls.version(), conn.tls.cipher()
            assert version is not None and cipher is not None
            return version, cipher[0]
        finally:
            conn.close()

    version, cipher = handshake(_root_ctx(root))
    assert version == "TLSv1.3" and cipher in (
        "TLS_AES_256_GCM_SHA384",
        "TLS_AES_128_GCM_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
    )
    tls12 = _root_ctx(root)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = handshake(tls12)
    assert version == "TLSv1.2" and cipher in TLS12_CIPHERS.split(":")
    assert "GCM" in cipher or "CHACHA20" in cipher

    # A TLS 1.2 client offering only CBC (non-AEAD) suites is refused.
    cbc = _root_ctx(root)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:AES128-SHA")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(cbc)

    # A TLS 1.1-only client is refused.
    old = _root_ctx(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(old)


# --- packaged-ca -----------------------------------------------------------------------------


def _chains_to(fullchain: Path, root: Path, name: str) -> None:
    chain = x509.load_pem_x509_certificates(fullchain.read_bytes())
    anchor = x509.load_pem_x509_certificate(root.read_bytes())
    verifier = PolicyBuilder().store(Store([anchor])).build_server_verifier(x509.DNSName(name))
    assert verifier.verify(chain[0], chain[1:])[-1] == anchor


def test_packaged_ca_chains_to_local_root_reused_then_reissued_when_expired(
    cli: Any, engine: Engine, proxies: None, flm_home: Path
) -> None:
    certs = flm_home / "certs"
    root = certs / "packaged-ca" / "root-ca.pem"
    server = certs / "packaged-ca" / "server.pem"
    port = free_port_pair()
    https_port = port + 1

    started = time.monotonic()
    first = _start(cli, "packaged-ca", port)
    assert time.monotonic() - started < 3.0
    root_fp = first["trust"]["fingerprint_sha256_root"]
    assert first["certificate"]["source"] == "issued"
    _chains_to(server, root, "localhost")
    ctx = _root_ctx(root)
    assert _chat(https_port, ctx, engine.key, "local ca") == expected_reply("local ca")
    served = https_call(https_port, ctx, "GET", "/v1/models", key=engine.key)[3]
    assert served == first["certificate"]["fingerprint_sha256"]
    assert x509.load_pem_x509_certificate(root.read_bytes()).not_valid_after_utc - datetime.now(
        UTC
    ) > timedelta(days=3640)  # the 10-year root

    # Restart: the same server certificate is served again (still valid).
    cli("proxy", "stop", "--all")
    second = _start(cli, "packaged-ca", port)
    assert second["certificate"]["source"] == "stored"
    assert second["certificate"]["fingerprint_sha256"] == served
    assert https_call(https_port, ctx, "GET", "/v1/models", key=engine.key)[3] == served

    # Let the certificate expire: issue one with a 1-day validity, three days ago.
    cli("proxy", "stop", "--all")
    ca = ensure_local_ca(certs)
    expired = ensure_server_cert(
        ca,
        certs,
        default_server_hosts(),
        validity_days=1,
        now=datetime.now(UTC) - timedelta(days=3),
    )
    assert expired.not_after < datetime.now(UTC)
    third = _start(cli, "packaged-ca", port)
    assert third["certificate"]["source"] == "issued"
    assert third["certificate"]["fingerprint_sha256"] not in (served, expired.fingerprint_sha256)
    assert third["trust"]["fingerprint_sha256_root"] == root_fp  # the root stays
    assert (
        https_call(https_port, ctx, "GET", "/v1/models", key=engine.key)[3]
        == third["certificate"]["fingerprint_sha256"]
    )
    _chains_to(server, root, "localhost")

    with sqlite3.connect(flm_home / "security.db") as db:
        row = db.execute(
            "SELECT fingerprint_sha256, not_after, cert_path FROM certificates "
            "WHERE id='packaged-ca'"
        ).fetchone()
    assert row == (
        third["certificate"]["fingerprint_sha256"],
        third["certificate"]["not_after"],
        str(server),
    )
    _assert_private_keys(certs)


def _curl(url: str, key: str) -> tuple[int, str]:
    argv, env = curl_with_system_trust(
        url, "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: Bearer {key}"
    )
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_install_ca_makes_curl_trust_flm_and_uninstall_ca_undoes_it(
    cli: Any, engine: Engine, proxies: None, flm_home: Path
) -> None:
    require_real_trust_store("the trust-store round trip")
    installed = Path("/usr/local/share/ca-certificates/flm-local-ca.crt")
    if installed.exists():
        pytest.skip(f"{installed} exists (a real FLM root is trusted here): not touching it")
    port = free_port_pair()
    data = _start(cli, "packaged-ca", port)
    root_fp = data["trust"]["fingerprint_sha256_root"]
    url = f"https://localhost:{port + 1}/v1/models"
    try:
        code, out = _curl(url, engine.key)
        assert code == 60, out  # not trusted yet

        plan = cli("security", "install-ca", "--dry-run").data
        assert plan["dry_run"] and not plan["executed"] and not installed.exists()
        assert plan["fingerprint_sha256"] == root_fp
        assert plan["commands"] == [["update-ca-certificates"]]

        done = cli("security", "install-ca")
        assert done.code == 0, done.out
        assert done.data["executed"] and done.data["fingerprint_sha256"] == root_fp
        assert (
            installed.read_bytes().strip()
            == (flm_home / "certs" / "packaged-ca" / "root-ca.pem").read_bytes().strip()
        )
        code, out = _curl(url, engine.key)
        assert (code, out) == (0, "200")

        removed = cli("security", "uninstall-ca")
        assert removed.code == 0, removed.out
        assert removed.data["executed"] and removed.data["fingerprint_sha256"] == root_fp
        assert not installed.exists()
        code, out = _curl(url, engine.key)
        assert code == 60, out
    finally:
        cli("security", "uninstall-ca")  # a no-op when already removed
        assert not installed.exists()


def test_install_ca_refuses_a_wrong_fingerprint(cli: Any, flm_home: Path) -> None:
    result = cli("security", "install-ca", "--fingerprint", "00" * 32)
    assert result.code == 1 and result.error["code"] == "PROXY_CERT_FAILED"
    assert "not the expected certificate" in result.error["message"]


# --- https-acme against Pebble ---------------------------------------------------------------


@dataclass
class AcmeEnv:
    pebble: Pebble
    port: int
    root: Path

    def ctx(self) -> ssl.SSLContext:
        return _root_ctx(self.root)


@pytest.fixture(scope="module")
def acme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeEnv]:
    """One Pebble for the module; its HTTP-01 validations go to FLM's HTTP port ``port``."""
    require_tool("pebble", "pebble")
    port = free_port_pair()
    workdir = tmp_path_factory.mktemp("pebble")
    with run_pebble(workdir, http_port=port) as pebble:
        root = workdir / "issuing-root.pem"
        root.write_bytes(pebble.root_pem())
        yield AcmeEnv(pebble, port, root)


@pytest.fixture
def acme(acme_server: AcmeEnv, monkeypatch: pytest.MonkeyPatch) -> AcmeEnv:
    monkeypatch.setenv("FLM_ACME_DIRECTORY", acme_server.pebble.directory_url)
    monkeypatch.setenv("FLM_ACME_CA_BUNDLE", str(acme_server.pebble.ca_bundle))
    return acme_server


def _acme_args(port: int) -> list[str]:
    return [
        "--mode",
        "https-acme",
        "--port",
        str(port),
        "--acme-domain",
        "localhost",
        "--acme-email",
        "admin@flm.test",
    ]


def _start_acme(cli: Any, port: int) -> dict[str, Any]:
    return start_proxy(*_acme_args(port))


def test_acme_certificate_obtained_through_http01_and_served(
    cli: Any, engine: Engine, proxies: None, acme: AcmeEnv, flm_home: Path
) -> None:
    data = _start_acme(cli, acme.port)
    https_port = acme.port + 1
    cert = data["certificate"]
    live = flm_home / "certs" / "acme-live" / "localhost"
    assert cert["source"] == "issued" and cert["domain"] == "localhost"
    assert cert["cert_path"] == str(live / "fullchain.pem")
    assert data["endpoints"] == [f"https://localhost:{https_port}"]
    assert data["certificate_expiry"] == cert["not_after"]
    _chains_to(live / "fullchain.pem", acme.root, "localhost")

    ctx = acme.ctx()
    assert _chat(https_port, ctx, engine.key, "acme hello") == expected_reply("acme hello")
    assert (
        https_call(https_port, ctx, "GET", "/v1/models", key=engine.key)[3]
        == cert["fingerprint_sha256"]
    )

    # The HTTP port serves only challenge answers (none pending now) and redirects the rest.
    assert http_get(acme.port, "/.well-known/acme-challenge/" + "A" * 43)[0] == 404
    status, headers, _ = http_get(acme.port, "/v1/models", host=f"localhost:{acme.port}")
    assert status == 301 and headers["location"] == f"https://localhost:{https_port}/v1/models"

    with sqlite3.connect(flm_home / "security.db") as db:
        row = db.execute(
            "SELECT mode, domain, fingerprint_sha256 FROM certificates "
            "WHERE id='https-acme:localhost'"
        ).fetchone()
    assert row == ("https-acme", "localhost", cert["fingerprint_sha256"])
    _assert_private_keys(flm_home / "certs")


def test_acme_forced_renewal_swaps_the_certificate_under_a_running_stream(
    cli: Any, engine: Engine, proxies: None, acme: AcmeEnv
) -> None:
    data = _start_acme(cli, acme.port)
    https_port = acme.port + 1
    old_fp = data["certificate"]["fingerprint_sha256"]
    engine.emu.behaviour = Behaviour(chunk_interval_s=0.1, stream_chunks=30)
    ctx = acme.ctx()

    conn = TlsConnection(https_port, ctx)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(
                {
                    "model": MODEL,
                    "stream": True,
                    "messages": [{"role": "user", "content": "keep streaming"}],
                }
            ).encode(),
            headers={"Authorization": f"Bearer {engine.key}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert peer_fingerprint(conn.tls) == old_fp
        events: list[tuple[float, bytes]] = []
        buf = b""

        def read_some() -> bool:
            nonlocal buf
            chunk = resp.read1(65536)
            if not chunk:
                return False
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                events.append((time.monotonic(), event))
            return True

        while len(events) < 3:
            assert read_some()

        renewed = cli("proxy", "renew", "--port", str(acme.port))
        assert renewed.code == 0, renewed.out
        result = renewed.data["renewed"][0]
        swapped_at = time.monotonic()
        assert result["renewed"] and result["previous_fingerprint_sha256"] == old_fp
        new_fp = result["fingerprint_sha256"]
        assert new_fp != old_fp

        # A new connection gets the new certificate at once (no restart)...
        assert https_call(https_port, ctx, "GET", "/v1/models", key=engine.key)[3] == new_fp
        # ...while the stream opened before the swap completes on its own connection.
        while read_some():
            pass
        assert peer_fingerprint(conn.tls) == old_fp
    finally:
        conn.close()
    assert events[-1][1] == b"data: [DONE]"
    assert any(t > swapped_at for t, _ in events[:-1]), "no chunk arrived after the swap"
    text = ""
    for _, event in events[:-1]:
        chunk = json.loads(event.removeprefix(b"data: "))
        if chunk["choices"]:
            text += chunk["choices"][0]["delta"].get("content") or ""
    assert text == expected_reply("keep streaming")
    status = _status(cli)
    assert status["certificate"]["fingerprint_sha256"] == new_fp
    assert status["certificate"]["renewals"] == 1 and status["last_error"] is None


def test_acme_five_issuances_in_a_row(cli: Any, proxies: None, acme: AcmeEnv) -> None:
    """Pebble refuses some nonces on purpose; every one of five orders must still succeed."""
    data = _start_acme(cli, acme.port)
    seen = [data["certificate"]["fingerprint_sha256"]]
    for _ in range(4):
        renewed = cli("proxy", "renew", "--port", str(acme.port))
        assert renewed.code == 0, renewed.out
        result = renewed.data["renewed"][0]
        assert result["renewed"] and result["previous_fingerprint_sha256"] == seen[-1]
        seen.append(result["fingerprint_sha256"])
        assert https_call(acme.port + 1, acme.ctx(), "GET", "/health")[3] == seen[-1]
    assert len(set(seen)) == 5


def test_acme_with_pebble_stopped_stored_certificate_or_error_with_fallback_advice(
    cli: Any, proxies: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flm_home: Path
) -> None:
    require_tool("pebble", "pebble")
    port = free_port_pair()
    https_port = port + 1
    live = flm_home / "certs" / "acme-live" / "localhost"
    with run_pebble(tmp_path / "pebble", http_port=port) as pebble:
        monkeypatch.setenv("FLM_ACME_DIRECTORY", pebble.directory_url)
        monkeypatch.setenv("FLM_ACME_CA_BUNDLE", str(pebble.ca_bundle))
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())
        issued = _start_acme(cli, port)["certificate"]["fingerprint_sha256"]
        cli("proxy", "stop", "--all")
        pebble.stop()

    # 1. A valid stored certificate: served although the ACME CA is gone.
    data = _start_acme(cli, port)
    assert data["certificate"]["source"] == "stored"
    assert data["certificate"]["fingerprint_sha256"] == issued
    assert any("reused the stored certificate" in n for n in data["notes"])
    assert https_call(https_port, _root_ctx(root), "GET", "/health")[3] == issued
    cli("proxy", "stop", "--all")

    # 2. A stored certificate due for renewal (10 days left): the renewal fails because the CA
    #    is down, and the proxy falls back to it, saying why.
    other_ca = trustme.CA()
    soon = other_ca.issue_cert("localhost", not_after=datetime.now(UTC) + timedelta(days=10))
    soon.private_key_pem.write_to_path(str(live / "privkey.pem"))
    soon.cert_chain_pems[0].write_to_path(str(live / "fullchain.pem"))
    data = _start_acme(cli, port)
    assert data["certificate"]["source"] == "stored-fallback"
    assert "connection refused" in data["last_error"]
    other_ctx = ssl.create_default_context()
    other_ca.configure_trust(other_ctx)
    assert (
        https_call(https_port, other_ctx, "GET", "/health")[3]
        == data["certificate"]["fingerprint_sha256"]
    )
    cli("proxy", "stop", "--all")
    with sqlite3.connect(flm_home / "security.db") as db:
        events = [
            r[0]
            for r in db.execute(
                "SELECT event_type FROM audit_logs WHERE event_type LIKE 'certificate_%'"
            )
        ]
    assert "certificate_renewal_failed" in events

    # 3. Nothing stored: the start fails with PROXY_ACME_ERROR and the fallback advice, and
    #    leaves nothing listening.
    shutil.rmtree(live)
    result = flm_subprocess("proxy", "start", *_acme_args(port))
    assert result.returncode == 1, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "PROXY_ACME_ERROR"
    message = error["message"]
    assert "connection refused" in message
    assert f"flm proxy start --mode dev-selfsigned --port {port}" in message
    assert str(live / "fullchain.pem") in message and str(live / "privkey.pem") in message
    assert error["details"]["fallback"]["mode"] == "dev-selfsigned"
    assert port_is_closed(port) and port_is_closed(https_port)


def test_acme_options_are_checked_before_anything_starts(cli: Any, flm_home: Path) -> None:
    port = str(free_port_pair())
    missing = cli(
        "proxy", "start", "--mode", "https-acme", "--port", port, "--acme-domain", "localhost"
    )
    assert missing.code == 1 and missing.error["code"] == "PROXY_INVALID_CONFIG"
    assert "--acme-email" in missing.error["message"]
    dns = cli("proxy", "start", *_acme_args(int(port)), "--challenge", "dns-01")
    assert dns.code == 1 and dns.error["code"] == "PROXY_INVALID_CONFIG"
    assert "--dns-profile" in dns.error["message"]
    wild = cli(
        "proxy",
        "start",
        "--mode",
        "https-acme",
        "--port",
        port,
        "--acme-domain",
        "*.example.com",
        "--acme-email",
        "admin@flm.test",
    )
    assert wild.code == 1 and wild.error["code"] == "PROXY_ACME_ERROR"
    assert "--challenge dns-01" in wild.error["message"]
    stray = cli(
        "proxy", "start", "--mode", "dev-selfsigned", "--port", port, "--acme-domain", "example.com"
    )
    assert stray.code == 1 and stray.error["code"] == "PROXY_INVALID_CONFIG"
    assert not (flm_home / "run" / "proxy-daemon.json").exists()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", int(port)))  # nothing was left listening
