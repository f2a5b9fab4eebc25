"""A real SOCKS5 server (Debian microsocks) on a free loopback port, shared by the egress
tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flm.egress.config import EgressConfig
from flm.egress.probe import probe

from ..tls.support import free_port, require_tool, stop_process, wait_until


@dataclass
class Socks:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def socks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Socks]:
    binary = require_tool("microsocks", "microsocks")
    port = free_port()
    log_path = tmp_path_factory.mktemp("microsocks") / "microsocks.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "-i", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    server = Socks(proc, port, log_path)
    try:
        config = EgressConfig("socks5", server.endpoint)
        wait_until(
            lambda: proc.poll() is None and probe(config, 1, timeout_s=0.5).reachable,
            timeout=10,
            what="microsocks to listen",
        )
        yield server
    finally:
        stop_process(proc)
