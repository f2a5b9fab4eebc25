"""DNS-01 providers against a real BIND 9 (RFC 2136 + TSIG) and the Cloudflare emulator:
records created, visible, deleted; each failure a named error with the fix, never the secret."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flm.core.errors import (
    DnsAuthError,
    DnsNotVisibleError,
    DnsServerUnreachableError,
    DnsUpdateRefusedError,
    DnsZoneNotFoundError,
)
from flm.testing.cloudflare import CloudflareEmulator, start_cloudflare
from flm.tls.dns01 import CloudflareProvider, Dns01Solver, Rfc2136Provider, txt_values

from .support import Bind, free_port, run_bind

OTHER_KEY = base64.b64encode(b"k" * 32).decode()


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bind]:
    with run_bind(tmp_path_factory.mktemp("bind"), extra_keys={"no-grant": OTHER_KEY}) as b:
        yield b


def _provider(
    bind: Bind,
    *,
    secret: str | None = None,
    key: str | None = None,
    zone: str | None = None,
    checks: tuple[str, ...] = (),
) -> Rfc2136Provider:
    return Rfc2136Provider(
        "home",
        zone or bind.zone,
        bind.address,
        key or bind.key_name,
        "hmac-sha256",
        secret or bind.secret,
        checks,
    )


def test_rfc2136_adds_waits_and_deletes(bind: Bind) -> None:
    provider = _provider(bind)
    assert provider.check_servers() == [("127.0.0.1", bind.port)]  # the primary = its NS
    solver = Dns01Solver(provider, 10, poll_interval_s=0.05)
    heard: list[str] = []
    solver.progress = heard.append
    records = [("_acme-challenge.flm.test", "value-one"), ("_acme-challenge.flm.test", "two")]
    solver.present(records, time.monotonic() + 10)
    assert bind.txt_records() == {"_acme-challenge.flm.test": {"value-one", "two"}}
    assert any("visible" in h for h in heard)
    solver.cleanup()
    assert bind.txt_records() == {}
    assert solver.cleanup_errors == []


def test_wrong_tsig_secret_is_dns_auth_failed_without_the_secret(bind: Bind) -> None:
    wrong = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(DnsAuthError) as caught:
        _provider(bind, secret=wrong).add_txt("_acme-challenge.flm.test", "x")
    error = caught.value
    assert error.code == "DNS_AUTH_FAILED"
    assert "rejected the signature" in error.message and "--replace" in error.message
    assert wrong not in error.message and wrong not in str(error.to_dict())
    with pytest.raises(DnsAuthError, match="does not know the key name"):
        _provider(bind, key="unknown-key").add_txt("_acme-challenge.flm.test", "x")
    assert bind.txt_records() == {}


def test_zone_not_found_update_refused_and_unreachable(bind: Bind) -> None:
    with pytest.raises(DnsZoneNotFoundError) as caught:
        _provider(bind, zone="other.test").add_txt("_acme-challenge.a.other.test", "x")
    assert caught.value.code == "DNS_ZONE_NOT_FOUND" and "--zone" in caught.value.message
    with pytest.raises(DnsZoneNotFoundError, match=r"not in zone flm\.test"):
        _provider(bind).add_txt("_acme-challenge.example.org", "x")
    with pytest.raises(DnsUpdateRefusedError) as refused:
        _provider(bind, key="no-grant", secret=OTHER_KEY).add_txt("_acme-challenge.flm.test", "x")
    assert refused.value.code == "DNS_UPDATE_REFUSED"
    assert "update-policy" in refused.value.message
    closed = Rfc2136Provider(
        "home", "flm.test", f"127.0.0.1:{free_port()}", bind.key_name, "hmac-sha256", bind.secret
    )
    with pytest.raises(DnsServerUnreachableError) as unreachable:
        closed.add_txt("_acme-challenge.flm.test", "x")
    assert unreachable.value.code == "DNS_SERVER_UNREACHABLE"
    assert bind.txt_records() == {}


def test_record_not_visible_by_the_deadline_is_named_and_cleaned_up(bind: Bind) -> None:
    silent = f"127.0.0.1:{free_port()}"  # nothing answers there
    provider = _provider(bind, checks=(bind.address, silent))
    solver = Dns01Solver(provider, 1.0, poll_interval_s=0.1)
    started = time.monotonic()
    with pytest.raises(DnsNotVisibleError) as caught:
        solver.present([("_acme-challenge.flm.test", "late")], time.monotonic() + 30)
    assert time.monotonic() - started < 10
    assert caught.value.code == "DNS_RECORD_NOT_VISIBLE"
    assert silent in caught.value.message and "--propagation-timeout" in caught.value.message
    solver.cleanup()
    assert bind.txt_records() == {}


# --- Cloudflare ----------------------------------------------------------------------------


@pytest.fixture
def cloudflare() -> Iterator[CloudflareEmulator]:
    with start_cloudflare("cf-token-123", zones=["flm.test"]) as emu:
        yield emu


def test_cloudflare_adds_waits_and_deletes(cloudflare: CloudflareEmulator) -> None:
    provider = CloudflareProvider(
        "cf", "flm.test", cloudflare.api_base, "cf-token-123", [f"127.0.0.1:{cloudflare.dns_port}"]
    )
    solver = Dns01Solver(provider, 5, poll_interval_s=0.05)
    solver.present(
        [("_acme-challenge.flm.test", "a"), ("_acme-challenge.flm.test", "b")], time.monotonic() + 5
    )
    records = cloudflare.records("flm.test")
    assert sorted(r["content"] for r in records) == ["a", "b"]
    assert {r["type"] for r in records} == {"TXT"} and {r["ttl"] for r in records} == {60}
    assert txt_values(("127.0.0.1", cloudflare.dns_port), "_acme-challenge.flm.test") == {"a", "b"}
    solver.cleanup()
    provider.close()
    assert cloudflare.records("flm.test") == []
    assert all(authorized for _, _, authorized in cloudflare.requests)
    methods = [m for m, _, _ in cloudflare.requests]
    assert methods.count("POST") == 2 and methods.count("DELETE") == 2


def test_cloudflare_errors_are_named(cloudflare: CloudflareEmulator) -> None:
    bad = CloudflareProvider("cf", "flm.test", cloudflare.api_base, "wrong-token")
    with pytest.raises(DnsAuthError) as caught:
        bad.add_txt("_acme-challenge.flm.test", "x")
    assert "DNS:Edit" in caught.value.message and "wrong-token" not in caught.value.message
    missing = CloudflareProvider("cf", "nope.test", cloudflare.api_base, "cf-token-123")
    with pytest.raises(DnsZoneNotFoundError):
        missing.add_txt("_acme-challenge.nope.test", "x")
    down = CloudflareProvider(
        "cf", "flm.test", f"http://127.0.0.1:{free_port()}/client/v4", "cf-token-123"
    )
    with pytest.raises(DnsServerUnreachableError):
        down.add_txt("_acme-challenge.flm.test", "x")
    assert cloudflare.records("flm.test") == []


def test_bind_fixture_is_isolated(tmp_path: Path) -> None:
    """Each BIND gets its own key: another instance's secret is refused."""
    with run_bind(tmp_path / "a") as one, run_bind(tmp_path / "b") as two:
        assert one.secret != two.secret and one.port != two.port
        with pytest.raises(DnsAuthError):
            Rfc2136Provider(
                "x", "flm.test", one.address, one.key_name, "hmac-sha256", two.secret
            ).add_txt("_acme-challenge.flm.test", "v")
