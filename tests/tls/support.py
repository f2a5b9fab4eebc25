"""Helpers for the TLS tests: tools from Debian packages, free ports, polling, Pebble."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from flm.tls.challenge import ChallengeStore
from tests.support import free_port, require_tool, wait_until


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def https_get(url: str, context: ssl.SSLContext, timeout: float = 5) -> bytes:
    assert url.startswith("https://")
    with urllib.request.urlopen(url, context=context, timeout=timeout) as resp:  # noqa: S310
        return bytes(resp.read())


# --- the HTTP-01 responder (what FLM's HTTP port will do) ----------------------------------------


@contextmanager
def challenge_server(store: ChallengeStore) -> Iterator[int]:
    """A loopback HTTP server answering ``/.well-known/acme-challenge/*`` from ``store``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = store.response_for_path(self.path)
            if body is None:
                self.send_error(404)
                return
            data = body.encode("ascii")
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- Pebble --------------------------------------------------------------------------------


@dataclass
class Pebble:
    process: subprocess.Popen[bytes]
    directory_url: str
    management_url: str
    ca_bundle: Path  # trusts Pebble's own HTTPS listener
    log_path: Path

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def root_pem(self) -> bytes:
        """The root that issued (through an intermediate) every certificate of this run."""
        return https_get(f"{self.management_url}/roots/0", self.ssl_context())

    def stop(self) -> None:
        stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextmanager
def run_pebble(
    workdir: Path,
    *,
    http_port: int,
    env: dict[str, str] | None = None,
    host: str = "localhost",
    listen: str = "127.0.0.1",
    dnsserver: str | None = None,
) -> Iterator[Pebble]:
    """Start Pebble on loopback ports; HTTP-01 validation goes to ``http_port``; with
    ``dnsserver`` (``127.0.0.1:PORT``) it resolves names (and DNS-01 TXT records) there.

    Its ACME directory is ``https://{host}:…/dir`` (its HTTPS certificate names ``host``,
    ``localhost`` and 127.0.0.1); it listens on ``listen``.
    """
    binary = require_tool("pebble", "pebble")
    workdir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server_cert = ca.issue_cert(*dict.fromkeys((host, "localhost", "127.0.0.1")))
    cert_file, key_file, ca_file = workdir / "cert.pem", workdir / "key.pem", workdir / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    server_cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    acme_port, mgmt_port, tls_port = free_port(), free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"{listen}:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{mgmt_port}",
            "certificate": str(cert_file),
            "privateKey": str(key_file),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    config_file = workdir / "pebble-config.json"
    config_file.write_text(json.dumps(config))
    log_path = workdir / "pebble.log"
    full_env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                "-config",
                str(config_file),
                "-strict=false",
                *(["-dnsserver", dnsserver] if dnsserver else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=workdir,
        )
    pebble = Pebble(
        process=proc,
        directory_url=f"https://{host}:{acme_port}/dir",
        management_url=f"https://localhost:{mgmt_port}",
        ca_bundle=ca_file,
        log_path=log_path,
    )
    try:
        context = pebble.ssl_context()

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"pebble exited with {proc.returncode}:\n{pebble.log()}")
            try:
                https_get(pebble.directory_url, context)
                https_get(f"{pebble.management_url}/roots/0", context)
            except OSError:
                return False
            return True

        wait_until(ready, timeout=20, what="pebble to listen")
        yield pebble
    finally:
        pebble.stop()


# --- FLM proxies over TLS (tests/tls/test_proxy_tls.py, tests/egress/test_proxy_egress.py) -------


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free on loopback (a TLS proxy uses both)."""
    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    pytest.fail("no two adjacent free ports on loopback")


def peer_fingerprint(sock: ssl.SSLSocket | ssl.SSLObject) -> str:
    """SHA-256 of the certificate the server presented, as ``AB:CD:…``."""
    import hashlib

    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


class TlsConnection(http.client.HTTPSConnection):
    """HTTPS to ``127.0.0.1:port`` presenting ``server_name`` (SNI and host-name check)."""

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext,
        server_name: str = "localhost",
        timeout: float = 15,
    ) -> None:
        super().__init__(server_name, port, context=context, timeout=timeout)
        self._ctx = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)

    @property
    def tls(self) -> ssl.SSLSocket:
        assert isinstance(self.sock, ssl.SSLSocket)
        return self.sock


def https_call(
    port: int,
    context: ssl.SSLContext,
    method: str,
    path: str,
    *,
    key: str | None = None,
    body: object = None,
    server_name: str = "localhost",
) -> tuple[int, dict[str, str], bytes, str]:
    """One request over a fresh TLS connection: (status, headers, body, peer fingerprint)."""
    conn = TlsConnection(port, context, server_name)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return (
            resp.status,
            {k.lower(): v for k, v in resp.getheaders()},
            payload,
            peer_fingerprint(conn.tls),
        )
    finally:
        conn.close()


def http_get(port: int, path: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A plain-HTTP GET to ``127.0.0.1:port`` (no redirect following)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


# --- BIND 9 (Debian bind9) as an unprivileged foreground process ---------------------------------


@dataclass
class Bind:
    process: subprocess.Popen[bytes]
    port: int
    zone: str
    key_name: str
    secret: str  # the TSIG secret (base64) BIND accepts for updates
    log_path: Path
    workdir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def txt_records(self) -> dict[str, set[str]]:
        """Every TXT record in the zone (by zone transfer), {name: {strings}}."""
        import dns.query
        import dns.rdatatype
        import dns.zone

        zone = dns.zone.from_xfr(
            dns.query.xfr("127.0.0.1", self.zone, port=self.port, timeout=5, lifetime=10)
        )
        found: dict[str, set[str]] = {}
        for name, rdataset in zone.iterate_rdatasets(dns.rdatatype.TXT):
            fqdn = name.derelativize(zone.origin).to_text(omit_final_dot=True)
            found[fqdn] = {b"".join(r.strings).decode() for r in rdataset}
        return found


@contextmanager
def run_bind(
    workdir: Path,
    *,
    zone: str = "flm.test",
    key_name: str = "flm-acme",
    extra_keys: dict[str, str] | None = None,
) -> Iterator[Bind]:
    """``named -g`` on a free loopback port with one primary zone that accepts TSIG-signed
    updates of TXT records from ``key_name`` (``extra_keys`` are known but may not update)."""
    import base64

    binary = shutil.which("named") or (
        "/usr/sbin/named" if Path("/usr/sbin/named").exists() else None
    )
    if binary is None:
        require_tool("named", "bind9")
    assert binary is not None
    workdir.mkdir(parents=True, exist_ok=True)
    secret = base64.b64encode(os.urandom(32)).decode()
    port = free_port()
    keys = {key_name: secret, **(extra_keys or {})}
    key_text = "".join(
        f'key "{n}" {{ algorithm hmac-sha256; secret "{s}"; }};\n' for n, s in keys.items()
    )
    (workdir / f"{zone}.zone").write_text(
        f"$TTL 60\n@ IN SOA ns.{zone}. admin.{zone}. 1 60 60 600 60\n"
        f"@ IN NS ns.{zone}.\nns IN A 127.0.0.1\n@ IN A 127.0.0.1\n"
    )
    conf = workdir / "named.conf"
    conf.write_text(f"""options {{
  directory "{workdir}";
  pid-file "{workdir}/named.pid";
  session-keyfile "{workdir}/session.key";
  managed-keys-directory "{workdir}";
  listen-on port {port} {{ 127.0.0.1; }};
  listen-on-v6 {{ none; }};
  recursion no;
  dnssec-validation no;
  notify no;
  allow-transfer {{ 127.0.0.1; }};
}};
controls {{ }};
{key_text}zone "{zone}" {{
  type primary;
  file "{workdir}/{zone}.zone";
  update-policy {{ grant {key_name} zonesub TXT; }};
}};
""")
    log_path = workdir / "named.log"
    # As root, -u would drop privileges to a user that cannot write the temporary directory;
    # the process needs none (the port is above 1024), so it runs as whoever runs the tests.
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "-g", "-4", "-n", "1", "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    bind = Bind(proc, port, zone, key_name, secret, log_path, workdir)
    try:
        import dns.message
        import dns.query

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"named exited with {proc.returncode}:\n{bind.log()}")
            try:
                reply = dns.query.udp(
                    dns.message.make_query(zone, "SOA"), "127.0.0.1", port=port, timeout=0.5
                )
            except Exception:
                return False
            return bool(reply.answer)

        wait_until(ready, timeout=20, what="named to serve the zone")
        yield bind
    finally:
        bind.stop()
