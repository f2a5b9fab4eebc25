"""A real Debian ``redis-server`` for the tests: a free loopback port, a temporary directory,
no persistence. It can be stopped and started again on the same port (an outage)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.support import free_port, require_tool


class RedisServer:
    def __init__(
        self, binary: str, directory: Path, password: str | None = None, tls: bool = False
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        #: with ``tls``: the CA that signed the server's certificate (for 127.0.0.1)
        self.ca_file: Path | None = _certificates(directory) if tls else None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.ca_file is not None else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        extra: dict[str, object] = {}
        if self.ca_file is not None:
            extra = {"ssl": True, "ssl_ca_certs": str(self.ca_file)}
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            decode_responses=True,
            **extra,  # type: ignore[arg-type]
        )

    def start(self) -> None:
        if self.ca_file is not None:
            d = self.directory
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            ports += ["--tls-cert-file", str(d / "server.pem"), "--tls-key-file"]
            ports += [str(d / "server.key"), "--tls-ca-cert-file", str(self.ca_file)]
        else:
            ports = ["--port", str(self.port)]
        args = [
            self.binary,
            *ports,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.exceptions.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None


def _certificates(directory: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it, in ``directory``."""
    from datetime import UTC, datetime, timedelta

    from flm.tls.certs import (
        build_ca_cert,
        build_server_cert,
        cert_to_pem,
        generate_key,
        key_to_pem,
    )

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key, server_key = generate_key(), generate_key()
    ca = build_ca_cert(
        ca_key, "test redis CA", not_before=now - timedelta(hours=1), not_after=now + timedelta(1)
    )
    server = build_server_cert(
        ca_cert=ca,
        ca_key=ca_key,
        server_key=server_key,
        hosts=["127.0.0.1"],
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(1),
    )
    (directory / "ca.pem").write_bytes(cert_to_pem(ca))
    (directory / "server.pem").write_bytes(cert_to_pem(server))
    (directory / "server.key").write_bytes(key_to_pem(server_key))
    (directory / "server.key").chmod(0o600)
    return directory / "ca.pem"


@contextmanager
def running_redis(
    directory: Path, password: str | None = None, *, tls: bool = False
) -> Iterator[RedisServer]:
    binary = require_tool("redis-server", "redis-server")
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, directory, password, tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
