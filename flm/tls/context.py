"""Server-side TLS settings, and certificates that can change while the server runs.

:func:`server_ssl_context` builds one hardened context: TLS 1.2 and 1.3 only; for 1.2 only ECDHE key
exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305); no compression, no renegotiation, the
server's cipher order.

:class:`ReloadableServerContext` is what a long-running server should use. Its ``context`` is
handed to the server once; a small SNI callback (OpenSSL calls it for every ClientHello, with or
without a server name) points each new connection at the *current* inner context. Replacing the
certificate is a single reference swap after the new context was built successfully, so:

- new connections get the new certificate at once, without a restart;
- connections already established keep the certificate they negotiated;
- a broken certificate file never takes effect (the old one stays and an error is raised).

The gateway's server takes it as is: ``HttpServer(app, sock, holder.context)`` (which is
``loop.create_server(..., ssl=holder.context)``).
"""

from __future__ import annotations

import ssl
import threading

from flm.core.errors import ProxyCertError
from flm.tls.certs import CertBundle, bundle_from_files

#: TLS 1.2 suites: ECDHE only (forward secrecy), AEAD only. TLS 1.3 suites are all AEAD.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def server_ssl_context(bundle: CertBundle) -> ssl.SSLContext:
    """A hardened server context holding ``bundle``'s certificate chain and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_SINGLE_ECDH_USE
    )
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(bundle.cert_path, bundle.key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ProxyCertError(
            f"cannot load the certificate {bundle.cert_path} with key {bundle.key_path}: {exc}"
        ) from exc
    return ctx


class ReloadableServerContext:
    """An ``SSLContext`` for a running server whose certificate can be replaced at any time.

    Thread-safe: :meth:`replace` may be called from another thread than the event loop's.
    """

    def __init__(self, bundle: CertBundle) -> None:
        self._lock = threading.Lock()
        self._bundle = bundle
        self._current = server_ssl_context(bundle)
        #: Hand this one to the server. It carries the initial certificate too, so it works even
        #: for a client library that would skip the SNI callback.
        self.context = server_ssl_context(bundle)
        self.context.sni_callback = self._select

    @property
    def bundle(self) -> CertBundle:
        """The certificate new connections are getting."""
        return self._bundle

    def replace(self, bundle: CertBundle) -> None:
        """Serve ``bundle`` to every new connection from now on.

        Raises :class:`ProxyCertError` (and keeps the old certificate) if it cannot be loaded.
        """
        fresh = server_ssl_context(bundle)
        with self._lock:
            self._current = fresh
            self._bundle = bundle

    def reload(self) -> bool:
        """Re-read the current bundle's files (after a renewal rewrote them in place).

        Returns True when the certificate changed.
        """
        old = self._bundle
        fresh = bundle_from_files(
            old.mode, old.cert_path, old.key_path, ca_path=old.ca_path, domain=old.domain
        )
        if fresh.fingerprint_sha256 == old.fingerprint_sha256:
            return False
        self.replace(fresh)
        return True

    def _select(
        self, conn: ssl.SSLObject, server_name: str | None, initial: ssl.SSLContext
    ) -> None:
        current = self._current
        if conn.context is not current:
            conn.context = current
