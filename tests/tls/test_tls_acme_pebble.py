"""ACME HTTP-01 issuance against a real Pebble (Debian package ``pebble``) on loopback."""

from __future__ import annotations

import asyncio
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from flm.core.errors import ProxyAcmeError
from flm.tls.acme_client import AcmeClient
from flm.tls.acme_store import load_acme_certificate, store_acme_certificate
from flm.tls.certs import cert_hosts, load_certs_pem, load_key_pem, public_key_matches
from flm.tls.challenge import ChallengeStore
from flm.tls.context import server_ssl_context

from .support import Pebble, challenge_server, free_port, require_tool, run_pebble


@pytest.fixture(scope="module")
def challenges() -> ChallengeStore:
    return ChallengeStore()


@pytest.fixture(scope="module")
def pebble(
    tmp_path_factory: pytest.TempPathFactory, challenges: ChallengeStore
) -> Iterator[Pebble]:
    require_tool("pebble", "pebble")
    with (
        challenge_server(challenges) as http_port,
        run_pebble(tmp_path_factory.mktemp("pebble"), http_port=http_port) as server,
    ):
        yield server


def _client(pebble: Pebble, key_dir: Path, **kwargs: float) -> AcmeClient:
    return AcmeClient(
        pebble.directory_url,
        "admin@flm.test",
        key_dir / "acme-account.pem",
        ca_bundle=pebble.ca_bundle,
        **kwargs,
    )


def _verify_chain(fullchain: bytes, root_pem: bytes, name: str) -> None:
    chain = load_certs_pem(fullchain)
    root = x509.load_pem_x509_certificate(root_pem)
    verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(name))
    verified = verifier.verify(chain[0], chain[1:])
    assert verified[-1] == root


def test_obtain_for_localhost_chains_to_pebble_root(
    pebble: Pebble, challenges: ChallengeStore, tmp_path: Path, flm_home: Path
) -> None:
    client = _client(pebble, tmp_path)
    fullchain, key_pem = client.obtain("localhost", challenges)

    _verify_chain(fullchain, pebble.root_pem(), "localhost")
    leaf = load_certs_pem(fullchain)[0]
    assert "localhost" in cert_hosts(leaf)
    assert public_key_matches(leaf, load_key_pem(key_pem))
    assert len(challenges) == 0  # tokens are removed once the order is done
    assert stat.S_IMODE((tmp_path / "acme-account.pem").stat().st_mode) == 0o600

    certs_dir = flm_home / "certs"
    bundle = store_acme_certificate(certs_dir, "localhost", fullchain, key_pem)
    assert bundle.cert_path == certs_dir / "acme-live" / "localhost" / "fullchain.pem"
    assert bundle.key_path == certs_dir / "acme-live" / "localhost" / "privkey.pem"
    assert stat.S_IMODE(bundle.key_path.stat().st_mode) == 0o600
    assert bundle.mode == "https-acme" and bundle.domain == "localhost"
    assert load_acme_certificate(certs_dir, "localhost") == replace(bundle, issued=False)

    # The stored certificate serves TLS that a client trusting only Pebble's root accepts.
    root_file = tmp_path / "pebble-root.pem"
    root_file.write_bytes(pebble.root_pem())
    asyncio.run(_handshake(server_ssl_context(bundle), root_file))


async def _handshake(server_ctx: ssl.SSLContext, root_file: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(root_file))
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        assert await reader.read() == b"ok"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_five_issuances_in_a_row(
    pebble: Pebble, challenges: ChallengeStore, tmp_path: Path
) -> None:
    client = _client(pebble, tmp_path)
    root = pebble.root_pem()
    fingerprints = set()
    for _ in range(5):
        fullchain, _key = client.obtain("localhost", challenges)
        _verify_chain(fullchain, root, "localhost")
        fingerprints.add(load_certs_pem(fullchain)[0].serial_number)
    assert len(fingerprints) == 5


def test_rejected_nonces_are_retried(tmp_path: Path) -> None:
    """With 60% of nonces refused, the library's single retry alone would fail most runs."""
    store = ChallengeStore()
    with (
        challenge_server(store) as http_port,
        run_pebble(
            tmp_path / "pebble", http_port=http_port, env={"PEBBLE_WFE_NONCEREJECT": "60"}
        ) as server,
    ):
        client = _client(server, tmp_path)
        for _ in range(2):
            fullchain, _key = client.obtain("localhost", store)
            _verify_chain(fullchain, server.root_pem(), "localhost")
    assert client.bad_nonce_retries > 0


def test_failed_validation_is_a_clear_error(pebble: Pebble, tmp_path: Path) -> None:
    # A fresh account (no reusable authorization) and a store the challenge server never sees.
    client = _client(pebble, tmp_path)
    with pytest.raises(ProxyAcmeError) as caught:
        client.obtain("localhost", ChallengeStore())
    message = caught.value.message
    assert caught.value.code == "PROXY_ACME_ERROR"
    assert "HTTP-01 validation of localhost failed" in message
    assert "/.well-known/acme-challenge/" in message


def test_untrusted_acme_server_names_the_ca_bundle_setting(
    pebble: Pebble, challenges: ChallengeStore, tmp_path: Path
) -> None:
    client = AcmeClient(pebble.directory_url, None, tmp_path / "k.pem", ca_bundle=None)
    with pytest.raises(ProxyAcmeError, match="FLM_ACME_CA_BUNDLE"):
        client.obtain("localhost", challenges)


def test_stopped_pebble_fails_fast_with_a_helpful_message(tmp_path: Path) -> None:
    store = ChallengeStore()
    with (
        challenge_server(store) as http_port,
        run_pebble(tmp_path / "p", http_port=http_port) as server,
    ):
        client = _client(server, tmp_path)
        client.obtain("localhost", store)  # works while it runs
        server.stop()
        started = time.monotonic()
        with pytest.raises(ProxyAcmeError) as caught:
            client.obtain("localhost", store)
    assert time.monotonic() - started < 5
    message = caught.value.message
    assert "connection refused" in message
    assert server.directory_url in message


def test_obtain_rejects_bad_domains_before_any_network(tmp_path: Path) -> None:
    client = AcmeClient(f"https://127.0.0.1:{free_port()}/dir", None, tmp_path / "k.pem")
    for bad in ("*.example.com", "127.0.0.1", "bad_host!", ""):
        with pytest.raises(ProxyAcmeError):
            client.obtain(bad, ChallengeStore())
    assert not (tmp_path / "k.pem").exists()
