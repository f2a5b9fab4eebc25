"""The hardened server context, and swapping certificates under a running server."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from flm.core.errors import ProxyCertError
from flm.tls.certs import CertBundle, fingerprint_sha256, load_cert_file
from flm.tls.context import ReloadableServerContext, server_ssl_context
from flm.tls.issue import ensure_dev_selfsigned, ensure_local_ca, ensure_server_cert


@pytest.fixture
def bundle(flm_home: Path) -> CertBundle:
    return ensure_dev_selfsigned(flm_home / "certs", lan_addresses=[])


def _client_ctx(bundle: CertBundle) -> ssl.SSLContext:
    assert bundle.ca_path is not None
    return ssl.create_default_context(cafile=str(bundle.ca_path))


def _colon_sha256(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


@asynccontextmanager
async def echo_server(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _connect(
    port: int, ctx: ssl.SSLContext, server_hostname: str | None = "localhost"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname
    )
    ssl_obj = writer.get_extra_info("ssl_object")
    der = ssl_obj.getpeercert(binary_form=True)
    return reader, writer, _colon_sha256(der)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: bytes) -> bytes:
    writer.write(text + b"\n")
    await writer.drain()
    return (await reader.readline()).rstrip(b"\n")


# --- policy -----------------------------------------------------------------------------


def test_context_policy(bundle: CertBundle) -> None:
    ctx = server_ssl_context(bundle)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
        assert cipher["aead"], cipher["name"]


@pytest.mark.parametrize(
    ("maximum", "ciphers", "accepted"),
    [
        (ssl.TLSVersion.TLSv1_3, None, True),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256", True),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305", True),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA", False),  # CBC, no AEAD
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-SHA384", False),  # CBC, no AEAD
    ],
)
def test_handshakes_allowed_and_refused(
    bundle: CertBundle, maximum: ssl.TLSVersion, ciphers: str | None, accepted: bool
) -> None:
    client = _client_ctx(bundle)
    client.maximum_version = maximum
    if ciphers:
        client.set_ciphers(ciphers)

    async def run() -> None:
        async with echo_server(server_ssl_context(bundle)) as port:
            if accepted:
                reader, writer, _ = await _connect(port, client)
                assert await _echo(reader, writer, b"hi") == b"hi"
                writer.close()
            else:
                # The server aborts the handshake: the client sees an alert or a reset.
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await _connect(port, client)

    asyncio.run(run())


def test_tls11_client_is_refused(bundle: CertBundle) -> None:
    client = _client_ctx(bundle)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            client.minimum_version = ssl.TLSVersion.TLSv1_1
            client.maximum_version = ssl.TLSVersion.TLSv1_1
        client.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")

    async def run() -> None:
        async with echo_server(server_ssl_context(bundle)) as port:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await _connect(port, client)

    asyncio.run(run())


def test_unloadable_bundle_is_a_cert_error(bundle: CertBundle, tmp_path: Path) -> None:
    broken = CertBundle(
        **{**bundle.__dict__, "key_path": tmp_path / "missing-key.pem"},
    )
    with pytest.raises(ProxyCertError, match=r"missing-key\.pem"):
        server_ssl_context(broken)


# --- swapping at runtime ------------------------------------------------------------------


def test_new_connections_get_the_new_certificate_old_ones_keep_going(flm_home: Path) -> None:
    certs = flm_home / "certs"
    ca = ensure_local_ca(certs)
    first = ensure_server_cert(ca, certs, ["localhost", "127.0.0.1"])
    client = _client_ctx(first)
    holder = ReloadableServerContext(first)

    async def run() -> None:
        async with echo_server(holder.context) as port:
            r1, w1, seen1 = await _connect(port, client)
            assert seen1 == first.fingerprint_sha256
            assert await _echo(r1, w1, b"before") == b"before"

            # Re-issue into the same files (new names force it), then swap.
            second = ensure_server_cert(ca, certs, ["localhost", "127.0.0.1", "flm.lan"])
            assert second.fingerprint_sha256 != first.fingerprint_sha256
            assert holder.reload() is True
            assert holder.bundle.fingerprint_sha256 == second.fingerprint_sha256

            r2, w2, seen2 = await _connect(port, client)
            assert seen2 == second.fingerprint_sha256
            # A client that sends no SNI (e.g. to an IP address) is switched too.
            _, w3, seen3 = await _connect(port, client, server_hostname="127.0.0.1")
            assert seen3 == second.fingerprint_sha256

            # The connection opened before the swap still works, on its old certificate.
            assert await _echo(r1, w1, b"after") == b"after"
            der = w1.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert _colon_sha256(der) == first.fingerprint_sha256
            assert await _echo(r2, w2, b"new") == b"new"
            for writer in (w1, w2, w3):
                writer.close()

    asyncio.run(run())
    assert holder.reload() is False  # nothing changed since


def test_replace_with_a_broken_certificate_keeps_the_old_one(
    bundle: CertBundle, tmp_path: Path
) -> None:
    holder = ReloadableServerContext(bundle)
    broken = CertBundle(**{**bundle.__dict__, "cert_path": tmp_path / "nope.pem"})
    with pytest.raises(ProxyCertError):
        holder.replace(broken)
    assert holder.bundle is bundle

    async def run() -> None:
        async with echo_server(holder.context) as port:
            _, writer, seen = await _connect(port, _client_ctx(bundle))
            assert seen == bundle.fingerprint_sha256
            writer.close()

    asyncio.run(run())


def test_gateway_server_serves_and_swaps_with_the_holder(flm_home: Path) -> None:
    """The recipe the gateway uses: its HTTP server gets ``holder.context`` once; replacing
    the certificate in the holder reaches the next connection without a restart."""
    from flm.http.server import HttpServer, bind_socket

    certs = flm_home / "certs"
    ca = ensure_local_ca(certs)
    first = ensure_server_cert(ca, certs, ["localhost"])
    second_dir = flm_home / "other"
    other_ca = ensure_local_ca(second_dir)
    second = ensure_server_cert(other_ca, second_dir, ["localhost"])
    holder = ReloadableServerContext(first)
    schemes: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        schemes.append(scope["scheme"])
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    async def fetch(port: int, bundle: CertBundle) -> str:
        reader, writer, seen = await _connect(port, _client_ctx(bundle))
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        body = await reader.read()
        writer.close()
        assert body.startswith(b"HTTP/1.1 200") and body.endswith(b"\r\n\r\nok")
        return seen

    async def run() -> None:
        sock = bind_socket("127.0.0.1", 0)
        server = HttpServer(app, sock, holder.context)
        await server.start()
        try:
            assert await fetch(server.port, first) == first.fingerprint_sha256
            holder.replace(second)
            assert await fetch(server.port, second) == second.fingerprint_sha256
        finally:
            await server.stop()
        assert schemes == ["https", "https"]

    asyncio.run(run())
    assert fingerprint_sha256(load_cert_file(second.cert_path)[0]) == second.fingerprint_sha256
