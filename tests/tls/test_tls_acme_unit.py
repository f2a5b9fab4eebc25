"""ACME helpers that need no server: settings, challenge store, certificate storage, renewal."""

from __future__ import annotations

import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flm.core.errors import ProxyAcmeError
from flm.tls.acme_client import AcmeClient
from flm.tls.acme_options import (
    LETSENCRYPT_PRODUCTION,
    LETSENCRYPT_STAGING,
    check_acme_names,
    check_challenge_type,
    resolve_acme_directory,
)
from flm.tls.acme_store import live_dir_name, load_acme_certificate, store_acme_certificate
from flm.tls.certs import needs_renewal
from flm.tls.challenge import ACME_CHALLENGE_PREFIX, ChallengeStore
from flm.tls.issue import ensure_local_ca, ensure_server_cert

T0 = datetime(2031, 6, 1, tzinfo=UTC)
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


# --- settings -------------------------------------------------------------------------------


def test_directory_defaults_to_staging() -> None:
    choice = resolve_acme_directory({})
    assert choice.url == LETSENCRYPT_STAGING
    assert choice.source == "staging" and choice.ca_bundle is None
    assert not choice.is_letsencrypt_production


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_use_prod_switches_to_production(value: str) -> None:
    choice = resolve_acme_directory({"FLM_ACME_USE_PROD": value})
    assert choice.url == LETSENCRYPT_PRODUCTION and choice.is_letsencrypt_production


def test_use_prod_false_stays_on_staging() -> None:
    assert resolve_acme_directory({"FLM_ACME_USE_PROD": "false"}).url == LETSENCRYPT_STAGING


def test_explicit_directory_wins_and_takes_a_ca_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    choice = resolve_acme_directory(
        {
            "FLM_ACME_DIRECTORY": "https://ca.internal:9000/acme/acme/directory",
            "FLM_ACME_USE_PROD": "true",
            "FLM_ACME_CA_BUNDLE": str(bundle),
        }
    )
    assert choice.url == "https://ca.internal:9000/acme/acme/directory"
    assert choice.source == "env" and choice.ca_bundle == bundle


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProxyAcmeError, match="https://"):
        resolve_acme_directory({"FLM_ACME_DIRECTORY": "http://ca.internal/directory"})
    with pytest.raises(ProxyAcmeError, match="not a file"):
        resolve_acme_directory({"FLM_ACME_CA_BUNDLE": str(tmp_path / "missing.pem")})


def test_challenge_types_and_acme_names() -> None:
    assert check_challenge_type("HTTP-01") == "http-01"
    assert check_challenge_type("DNS-01") == "dns-01"
    with pytest.raises(ProxyAcmeError, match="unknown ACME challenge"):
        check_challenge_type("tls-alpn-01")
    assert live_dir_name("*.flm.test") == "_.flm.test"


@pytest.mark.parametrize(
    ("names", "wildcard_ok", "expected"),
    [
        (["*.FLM.test", "flm.test", "*.flm.test."], True, ["*.flm.test", "flm.test"]),
        (["flm.test", "api.flm.test"], False, ["flm.test", "api.flm.test"]),
        (["*.flm.test"], False, "--challenge dns-01"),  # a wildcard needs DNS-01
        (["*.*.flm.test"], True, "wildcard names are not supported"),
        (["a.*.flm.test"], True, "wildcard names are not supported"),
        (["127.0.0.1"], True, "not an IP address"),
        ([""], True, "empty host name"),
        ([], True, "--acme-domain is required"),
    ],
)
def test_acme_names(names: list[str], wildcard_ok: bool, expected: list[str] | str) -> None:
    if isinstance(expected, list):
        assert check_acme_names(names, wildcard_ok=wildcard_ok) == expected
    else:
        with pytest.raises(ProxyAcmeError, match=expected):
            check_acme_names(names, wildcard_ok=wildcard_ok)


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ProxyAcmeError):
        AcmeClient(LETSENCRYPT_STAGING, None, tmp_path / "k.pem", timeout_s=0)


# --- the challenge store --------------------------------------------------------------------


def test_challenge_store_serves_only_well_formed_known_tokens() -> None:
    store = ChallengeStore()
    store[TOKEN] = f"{TOKEN}.thumbprint"
    assert store.response_for_path(ACME_CHALLENGE_PREFIX + TOKEN) == f"{TOKEN}.thumbprint"
    assert store.response_for_path(ACME_CHALLENGE_PREFIX + "x" * 43) is None
    assert store.response_for_path(ACME_CHALLENGE_PREFIX + "../../etc/passwd") is None
    assert store.response_for_path("/" + TOKEN) is None
    assert store.response_for_path(ACME_CHALLENGE_PREFIX) is None
    with pytest.raises(ValueError):
        store["../bad"] = "x"
    del store[TOKEN]
    assert len(store) == 0 and store.pop(TOKEN, None) is None


def test_challenge_store_is_thread_safe() -> None:
    store = ChallengeStore()

    def writer(n: int) -> None:
        for i in range(200):
            token = f"{n:04d}{i:04d}" + "a" * 20
            store[token] = token
            assert store.get(token) == token
            list(store)
            store.pop(token)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 0


# --- storage and renewal --------------------------------------------------------------------


def _issued(tmp_path: Path, hosts: list[str], days: float = 90) -> tuple[bytes, bytes]:
    ca = ensure_local_ca(tmp_path / "ca", now=T0)
    bundle = ensure_server_cert(ca, tmp_path / "ca", hosts, validity_days=days, now=T0)
    return bundle.cert_path.read_bytes(), bundle.key_path.read_bytes()


def test_store_and_load(flm_home: Path, tmp_path: Path) -> None:
    cert, key = _issued(tmp_path, ["flm.example.org"])
    certs = flm_home / "certs"
    bundle = store_acme_certificate(certs, "FLM.example.org.", cert, key)
    directory = certs / "acme-live" / "flm.example.org"
    assert bundle.cert_path == directory / "fullchain.pem"
    assert stat.S_IMODE((directory / "privkey.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert bundle.record_id == "https-acme:flm.example.org"
    loaded = load_acme_certificate(certs, "flm.example.org", now=T0 + timedelta(days=1))
    assert loaded is not None and loaded.fingerprint_sha256 == bundle.fingerprint_sha256
    assert load_acme_certificate(certs, "flm.example.org", now=T0 + timedelta(days=91)) is None
    assert load_acme_certificate(certs, "other.example.org") is None


def test_store_refuses_mismatched_material(flm_home: Path, tmp_path: Path) -> None:
    cert, key = _issued(tmp_path, ["a.example.org"])
    _, other_key = _issued(tmp_path / "second", ["b.example.org"])
    certs = flm_home / "certs"
    with pytest.raises(ProxyAcmeError, match="does not match its key"):
        store_acme_certificate(certs, "a.example.org", cert, other_key)
    with pytest.raises(ProxyAcmeError, match="does not name"):
        store_acme_certificate(certs, "c.example.org", cert, key)
    with pytest.raises(ProxyAcmeError):
        store_acme_certificate(certs, "a.example.org", b"junk", key)
    with pytest.raises(ProxyAcmeError):
        store_acme_certificate(certs, "../../etc", cert, key)
    assert not (certs / "acme-live" / "a.example.org" / "privkey.pem").exists()


def test_needs_renewal(tmp_path: Path) -> None:
    cert, _ = _issued(tmp_path, ["flm.example.org"], days=90)
    assert not needs_renewal(cert, T0 + timedelta(days=1))
    assert not needs_renewal(cert, T0 + timedelta(days=59))
    assert needs_renewal(cert, T0 + timedelta(days=61))
    assert needs_renewal(cert, T0 + timedelta(days=61), days=30)
    assert not needs_renewal(cert, T0 + timedelta(days=61), days=10)
    assert needs_renewal(cert, T0 + timedelta(days=100), days=0)
    assert needs_renewal(cert, T0 - timedelta(days=2))  # not valid yet
