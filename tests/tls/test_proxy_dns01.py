"""``flm proxy start --mode https-acme --challenge dns-01`` through the real CLI and daemon,
against a real BIND 9 and Pebble (``-dnsserver`` pointing at BIND), and against the Cloudflare
emulator: wildcard + apex certificates issued and served, renewal swapped in under an open
stream, the named errors, the stored certificate kept when renewal fails, and the DNS secret
nowhere it must not be."""

from __future__ import annotations

import json
import os
import sqlite3
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flm.testing.cloudflare import start_cloudflare
from flm.testing.emulators import Behaviour, Emulator, expected_reply, start_emulator
from tests.conftest import flm_subprocess

from .support import (
    Bind,
    Pebble,
    TlsConnection,
    free_port,
    free_port_pair,
    http_get,
    https_call,
    peer_fingerprint,
    port_is_closed,
    require_tool,
    run_bind,
    run_pebble,
)

MODEL = "flm://eng/chat-model:1b"
NAMES = ("*.flm.test", "flm.test")


@dataclass
class Engine:
    emu: Emulator
    key: str


@dataclass
class DnsEnv:
    bind: Bind
    pebble: Pebble
    root: Path

    def ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root))


@pytest.fixture
def engine(cli: Any) -> Iterator[Engine]:
    with start_emulator("vllm", models=["chat-model:1b"]) as emu:
        assert cli("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "eng").code == 0
        key = cli("api-keys", "create", "--label", "dns01-tests").data["key"]
        yield Engine(emu, key)


@pytest.fixture
def proxies(cli: Any) -> Iterator[None]:
    try:
        yield
    finally:
        cli("proxy", "stop", "--all")


@contextmanager
def dns_stack(workdir: Path) -> Iterator[DnsEnv]:
    """A BIND serving flm.test and a Pebble that resolves through it."""
    require_tool("pebble", "pebble")
    with (
        run_bind(workdir / "bind") as bind,
        # No authorization reuse: every order (renewals too) must go through DNS-01.
        run_pebble(
            workdir / "pebble",
            http_port=free_port(),
            dnsserver=bind.address,
            env={"PEBBLE_AUTHZREUSE": "0"},
        ) as pebble,
    ):
        root = workdir / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())
        yield DnsEnv(bind, pebble, root)


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsEnv]:
    with dns_stack(tmp_path_factory.mktemp("dns01")) as env:
        yield env


def _use_pebble(monkeypatch: pytest.MonkeyPatch, pebble: Pebble) -> None:
    monkeypatch.setenv("FLM_ACME_DIRECTORY", pebble.directory_url)
    monkeypatch.setenv("FLM_ACME_CA_BUNDLE", str(pebble.ca_bundle))


@pytest.fixture
def dns_env(dns_server: DnsEnv, monkeypatch: pytest.MonkeyPatch) -> DnsEnv:
    _use_pebble(monkeypatch, dns_server.pebble)
    return dns_server


def add_bind_profile(
    cli: Any, bind: Bind, *, secret: str | None = None, name: str = "home"
) -> None:
    result = cli(
        "secrets",
        "dns",
        "add",
        name,
        "--provider",
        "rfc2136",
        "--server",
        bind.address,
        "--zone",
        bind.zone,
        "--tsig-name",
        bind.key_name,
        "--tsig-algorithm",
        "hmac-sha256",
        stdin=(secret or bind.secret) + "\n",
    )
    assert result.code == 0, result.out
    assert (secret or bind.secret) not in result.out + result.err


def dns_args(port: int, profile: str = "home") -> list[str]:
    args = [
        "--mode",
        "https-acme",
        "--port",
        str(port),
        "--challenge",
        "dns-01",
        "--dns-profile",
        profile,
        "--acme-email",
        "admin@flm.test",
    ]
    for name in NAMES:
        args += ["--acme-domain", name]
    return args


def start_proxy(*args: str) -> dict[str, Any]:
    result = flm_subprocess("proxy", "start", *args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout)["data"]
    return data


def _status(cli: Any) -> dict[str, Any]:
    proxies: list[dict[str, Any]] = cli("proxy", "status").data["proxies"]
    assert len(proxies) == 1, proxies
    return proxies[0]


def _renewal_failures(home: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(home / "security.db") as db:
        rows = db.execute(
            "SELECT details_json FROM audit_logs WHERE event_type = "
            "'certificate_renewal_failed' ORDER BY id"
        ).fetchall()
    return [json.loads(r[0]) for r in rows]


# --- issuance ------------------------------------------------------------------------------


def test_wildcard_and_apex_certificate_issued_through_bind_and_served(
    cli: Any, engine: Engine, proxies: None, dns_env: DnsEnv, flm_home: Path
) -> None:
    add_bind_profile(cli, dns_env.bind)
    port = free_port_pair()
    https_port = port + 1
    data = start_proxy(*dns_args(port))
    cert = data["certificate"]
    assert cert["source"] == "issued" and cert["domain"] == "*.flm.test"
    assert cert["challenge"] == "dns-01" and cert["dns_profile"] == "home"
    assert cert["names"] == list(NAMES)
    assert set(cert["hosts"]) == set(NAMES)
    live = flm_home / "certs" / "acme-live" / "_.flm.test"
    assert cert["cert_path"] == str(live / "fullchain.pem")
    assert data["endpoints"] == [f"https://{n}:{https_port}" for n in NAMES]

    # The running gateway serves it to a client that trusts only Pebble's root, for the apex
    # and for any name under the wildcard.
    ctx = dns_env.ctx()
    for name in ("flm.test", "api.flm.test", "x1.flm.test"):
        status, _, _, fingerprint = https_call(
            https_port, ctx, "GET", "/v1/models", key=engine.key, server_name=name
        )
        assert status == 200 and fingerprint == cert["fingerprint_sha256"]
    status, _, body, _ = https_call(
        https_port,
        ctx,
        "POST",
        "/v1/chat/completions",
        key=engine.key,
        server_name="api.flm.test",
        body={"model": MODEL, "messages": [{"role": "user", "content": "wild"}]},
    )
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == expected_reply("wild")

    # The TXT records are gone from the zone; the HTTP port only redirects (no challenges).
    assert dns_env.bind.txt_records() == {}
    status, headers, _ = http_get(
        port, "/.well-known/acme-challenge/" + "A" * 43, host=f"flm.test:{port}"
    )
    assert status == 301
    assert (
        headers["location"]
        == f"https://flm.test:{https_port}/.well-known/acme-challenge/" + "A" * 43
    )
    with sqlite3.connect(flm_home / "security.db") as db:
        row = db.execute(
            "SELECT domain, fingerprint_sha256 FROM certificates WHERE id = 'https-acme:*.flm.test'"
        ).fetchone()
    assert row == ("*.flm.test", cert["fingerprint_sha256"])


def test_dns01_renewal_swaps_the_certificate_under_an_open_stream(
    cli: Any, engine: Engine, proxies: None, dns_env: DnsEnv
) -> None:
    add_bind_profile(cli, dns_env.bind)
    port = free_port_pair()
    https_port = port + 1
    old_fp = start_proxy(*dns_args(port))["certificate"]["fingerprint_sha256"]
    engine.emu.behaviour = Behaviour(chunk_interval_s=0.1, stream_chunks=30)
    ctx = dns_env.ctx()
    conn = TlsConnection(https_port, ctx, "api.flm.test")
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
        assert resp.status == 200 and peer_fingerprint(conn.tls) == old_fp
        assert resp.read1(65536)
        renewed = cli("proxy", "renew", "--port", str(port))
        assert renewed.code == 0, renewed.out
        result = renewed.data["renewed"][0]
        new_fp = result["fingerprint_sha256"]
        assert result["renewed"] and result["previous_fingerprint_sha256"] == old_fp
        assert new_fp != old_fp
        assert https_call(https_port, ctx, "GET", "/health", server_name="flm.test")[3] == new_fp
        rest = b""
        while chunk := resp.read1(65536):
            rest += chunk
        assert rest.rstrip().endswith(b"data: [DONE]")  # the old connection finished its stream
        assert peer_fingerprint(conn.tls) == old_fp
    finally:
        conn.close()
    assert dns_env.bind.txt_records() == {}
    status = _status(cli)
    assert status["certificate"]["fingerprint_sha256"] == new_fp
    assert status["certificate"]["renewals"] == 1 and status["last_error"] is None


# --- failures ------------------------------------------------------------------------------


def test_wrong_tsig_secret_is_named_leaves_nothing_and_exits_1(
    cli: Any, proxies: None, dns_env: DnsEnv, flm_home: Path
) -> None:
    import base64

    wrong = base64.b64encode(os.urandom(32)).decode()
    add_bind_profile(cli, dns_env.bind, secret=wrong)
    port = free_port_pair()
    result = flm_subprocess("proxy", "start", *dns_args(port), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "DNS_AUTH_FAILED"
    assert "--tsig-name" in error["message"] and "flm secrets dns add home" in error["message"]
    assert wrong not in result.stdout + result.stderr
    assert dns_env.bind.txt_records() == {}
    assert port_is_closed(port) and port_is_closed(port + 1)


def test_unknown_profile_is_refused_before_anything_listens(
    cli: Any, proxies: None, dns_env: DnsEnv
) -> None:
    port = free_port_pair()
    result = flm_subprocess("proxy", "start", *dns_args(port, profile="nope"))
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "DNS_PROFILE_NOT_FOUND" and "flm secrets dns add" in error["message"]
    assert port_is_closed(port) and port_is_closed(port + 1)


def test_bind_stopped_during_renewal_keeps_the_old_certificate_serving(
    cli: Any, proxies: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flm_home: Path
) -> None:
    with dns_stack(tmp_path) as env:
        _use_pebble(monkeypatch, env.pebble)
        add_bind_profile(cli, env.bind)
        port = free_port_pair()
        old_fp = start_proxy(*dns_args(port))["certificate"]["fingerprint_sha256"]
        env.bind.stop()
        renewed = cli("proxy", "renew", "--port", str(port))
        assert renewed.code == 1, renewed.out
        assert renewed.error["code"] == "DNS_SERVER_UNREACHABLE"
        assert "is it running" in renewed.error["message"]
        # The stored, still valid certificate keeps serving...
        assert (
            https_call(port + 1, env.ctx(), "GET", "/health", server_name="flm.test")[3] == old_fp
        )
        # ...and the failure is in `proxy status` and in the audit log.
        status = _status(cli)
        assert status["certificate"]["fingerprint_sha256"] == old_fp
        assert "DNS_SERVER_UNREACHABLE" in status["last_error"]
        failures = _renewal_failures(flm_home)
        assert failures and failures[-1]["code"] == "DNS_SERVER_UNREACHABLE"
        assert failures[-1]["challenge"] == "dns-01"
        assert env.bind.secret not in json.dumps(failures)


# --- the secret stays secret ---------------------------------------------------------------


def _cmdlines() -> list[bytes]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes())
            except OSError:
                continue
    return found


def test_canary_secret_only_in_the_secrets_store(
    cli: Any, proxies: None, dns_env: DnsEnv, flm_home: Path
) -> None:
    canary = dns_env.bind.secret  # the real TSIG secret, so the daemon really uses it
    added = flm_subprocess(
        "secrets",
        "dns",
        "add",
        "home",
        "--provider",
        "rfc2136",
        "--server",
        dns_env.bind.address,
        "--zone",
        "flm.test",
        "--tsig-name",
        dns_env.bind.key_name,
        "--tsig-secret-file",
        "-",
        input=canary + "\n",
    )
    assert added.returncode == 0, added.stdout + added.stderr
    listed = flm_subprocess("secrets", "dns", "list")
    port = free_port_pair()
    started = flm_subprocess("proxy", "start", *dns_args(port), timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    renewed = flm_subprocess("proxy", "renew", "--port", str(port), timeout=120)
    assert renewed.returncode == 0, renewed.stdout

    profiles = json.loads(listed.stdout)["data"]
    assert profiles["profiles"][0]["secret_store"] in ("file", "keyring")
    assert "secrets_location" in profiles
    for output in (added, listed, started, renewed):
        assert canary not in output.stdout + output.stderr
    store = flm_home / "secrets" / "dns"
    for path in flm_home.rglob("*"):
        if path.is_file() and path.parent != store:
            assert canary.encode() not in path.read_bytes(), path
    if profiles["profiles"][0]["secret_store"] == "file":
        secret_file = store / "home.secret"
        assert secret_file.read_text().strip() == canary
        assert secret_file.stat().st_mode & 0o777 == 0o600
        assert store.stat().st_mode & 0o777 == 0o700
    assert all(canary.encode() not in c for c in _cmdlines())  # the daemon is running now
    assert cli("secrets", "dns", "remove", "home").code == 0
    assert not (store / "home.secret").exists()


# --- the hosted provider -------------------------------------------------------------------


def test_cloudflare_emulator_issues_the_same_wildcard_certificate(
    cli: Any, engine: Engine, proxies: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "cf-" + os.urandom(12).hex()
    with (
        start_cloudflare(token, zones=["flm.test"]) as cf,
        run_pebble(
            tmp_path / "pebble",
            http_port=free_port(),
            dnsserver=f"127.0.0.1:{cf.dns_port}",
            env={"PEBBLE_AUTHZREUSE": "0"},
        ) as pebble,
    ):
        _use_pebble(monkeypatch, pebble)
        root = tmp_path / "root.pem"
        root.write_bytes(pebble.root_pem())
        added = cli(
            "secrets",
            "dns",
            "add",
            "cf",
            "--provider",
            "cloudflare",
            "--zone",
            "flm.test",
            "--api-base",
            cf.api_base,
            "--check-server",
            f"127.0.0.1:{cf.dns_port}",
            stdin=token + "\n",
        )
        assert added.code == 0, added.out
        port = free_port_pair()
        data = start_proxy(*dns_args(port, profile="cf"))
        cert = data["certificate"]
        assert set(cert["hosts"]) == set(NAMES)
        ctx = ssl.create_default_context(cafile=str(root))
        for name in ("flm.test", "www.flm.test"):
            status, _, _, fingerprint = https_call(
                port + 1, ctx, "GET", "/v1/models", key=engine.key, server_name=name
            )
            assert status == 200 and fingerprint == cert["fingerprint_sha256"]
        assert cf.records("flm.test") == []
        calls = [(m, authorized) for m, _, authorized in cf.requests]
        assert calls.count(("POST", True)) == 2 and calls.count(("DELETE", True)) == 2
        assert ("_acme-challenge.flm.test", "TXT") in cf.dns_queries  # Pebble looked there


def test_ca_refusal_is_named_and_the_records_are_removed(
    cli: Any, proxies: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLM publishes in BIND, but the CA resolves through another server that never has the
    record: the CA refuses, the error says so, and BIND is left clean."""
    with (
        run_bind(tmp_path / "bind") as bind,
        start_cloudflare("unused", zones=["flm.test"]) as elsewhere,
        run_pebble(
            tmp_path / "pebble", http_port=free_port(), dnsserver=f"127.0.0.1:{elsewhere.dns_port}"
        ) as pebble,
    ):
        _use_pebble(monkeypatch, pebble)
        add_bind_profile(cli, bind)
        port = free_port_pair()
        result = flm_subprocess("proxy", "start", *dns_args(port), timeout=120)
        assert result.returncode == 1, result.stdout + result.stderr
        error = json.loads(result.stdout)["error"]
        assert error["code"] == "ACME_CA_REFUSED"
        assert "_acme-challenge.flm.test" in error["message"]
        assert "certbot certonly --manual --preferred-challenges dns" in error["message"]
        assert ("_acme-challenge.flm.test", "TXT") in elsewhere.dns_queries
        assert bind.txt_records() == {}
        assert port_is_closed(port) and port_is_closed(port + 1)


def test_a_stored_certificate_due_for_renewal_is_renewed_through_dns01(
    cli: Any, proxies: None, dns_env: DnsEnv, flm_home: Path
) -> None:
    """The 30-day rule picks DNS-01 too: a stored certificate with 10 days left is replaced at
    start; the fresh one is then not due (`renew --if-due` is what the renewal task does)."""
    from datetime import UTC, datetime, timedelta

    import trustme

    live = flm_home / "certs" / "acme-live" / "_.flm.test"
    live.mkdir(parents=True, mode=0o700)
    soon = trustme.CA().issue_cert(*NAMES, not_after=datetime.now(UTC) + timedelta(days=10))
    soon.private_key_pem.write_to_path(str(live / "privkey.pem"))
    soon.cert_chain_pems[0].write_to_path(str(live / "fullchain.pem"))
    add_bind_profile(cli, dns_env.bind)
    port = free_port_pair()
    cert = start_proxy(*dns_args(port))["certificate"]
    assert cert["source"] == "issued" and set(cert["hosts"]) == set(NAMES)
    assert (
        https_call(port + 1, dns_env.ctx(), "GET", "/health", server_name="a.flm.test")[3]
        == cert["fingerprint_sha256"]
    )
    if_due = cli("proxy", "renew", "--port", str(port), "--if-due")
    assert if_due.code == 0 and if_due.data["renewed"][0]["renewed"] is False
    assert dns_env.bind.txt_records() == {}


def test_a_stored_certificate_for_fewer_names_is_not_reused(
    cli: Any, proxies: None, dns_env: DnsEnv, flm_home: Path
) -> None:
    add_bind_profile(cli, dns_env.bind)
    port = free_port_pair()
    first = flm_subprocess(
        "proxy",
        "start",
        "--mode",
        "https-acme",
        "--port",
        str(port),
        "--challenge",
        "dns-01",
        "--dns-profile",
        "home",
        "--acme-email",
        "admin@flm.test",
        "--acme-domain",
        "*.flm.test",
        timeout=120,
    )
    assert first.returncode == 0, first.stdout
    assert json.loads(first.stdout)["data"]["certificate"]["hosts"] == ["*.flm.test"]
    cli("proxy", "stop", "--all")
    cert = start_proxy(*dns_args(port))["certificate"]  # now also the apex
    assert cert["source"] == "issued" and set(cert["hosts"]) == set(NAMES)
