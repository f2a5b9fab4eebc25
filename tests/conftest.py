"""Shared fixtures: every test gets its own FLM home and a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from flm.cli import main as cli_main
from flm.engines import kinds

#: Each kind's address variables (from its descriptor) and the ACME ones: cleared per test.
_ENGINE_ENV = (
    *(name for kind in kinds.all_kinds() for name in (kind.host_env, kind.port_env) if name),
    "FLM_ACME_DIRECTORY",
    "FLM_ACME_USE_PROD",
    "FLM_ACME_CA_BUNDLE",
)


@pytest.fixture(autouse=True)
def flm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated data directory (mode 0700) per test; engine env overrides cleared."""
    home = tmp_path / "flm-home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("FLM_HOME", str(home))
    for name in _ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    yield home


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def data(self) -> Any:
        body = self.json
        assert "data" in body, body
        return body["data"]

    @property
    def error(self) -> dict[str, Any]:
        body = self.json
        assert "error" in body, body
        return body["error"]  # type: ignore[no-any-return]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    """Run ``flm`` in-process: ``cli("api-keys", "list")`` -> CliResult."""

    def run(*args: str, stdin: str | None = None) -> CliResult:
        import io

        old_stdin = sys.stdin
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        try:
            code = cli_main(list(args))
        finally:
            sys.stdin = old_stdin
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def flm_subprocess(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``flm`` console entry point in a child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flm", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        input=input,
        check=False,
    )


def audit_rows(home: Path, sql: str, *, flush: Any = None, timeout: float = 10) -> list[Any]:
    """Rows of ``sql`` on ``home``'s security.db once there are any (audit records are written
    off the request path): polled with a deadline, calling ``flush`` (e.g. a gateway's
    ``runtime.audit.flush``) before each look. Empty if none came in time."""
    import sqlite3
    import time

    deadline = time.monotonic() + timeout
    while True:
        if flush is not None:
            flush()
        conn = sqlite3.connect(home / "security.db")
        try:
            rows = conn.execute(sql).fetchall()
        finally:
            conn.close()
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.01)


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (root only): a disk that can be filled."""
    where.mkdir()
    why = None
    if os.geteuid() != 0:
        why = "mounting a tmpfs needs root"
    else:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            why = f"mount -t tmpfs was refused: {done.stderr.strip()}"
    if why is not None:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount_read_only(where: Path) -> None:
    done = subprocess.run(
        ["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


#: Whole modules of integration tests (real TLS listeners, Pebble, many processes).
_SLOW_MODULES = (
    "/e2e/",
    "/tls/test_proxy_tls.py",
    "/tls/test_tls_acme_pebble.py",
    "/cli/test_concurrency.py",
)
#: A test that calls one of these starts FLM processes or changes the machine's trust store.
_SLOW_CALLS = frozenset({"flm_subprocess", "require_real_trust_store"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Integration tests are ``slow``: ``scripts/check`` leaves them to ``scripts/test``."""
    slow = pytest.mark.slow
    for item in items:
        function = getattr(item, "function", None)
        names = getattr(getattr(function, "__code__", None), "co_names", ())
        path = str(getattr(item, "path", ""))
        if _SLOW_CALLS.intersection(names) or any(m in path for m in _SLOW_MODULES):
            item.add_marker(slow)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real ``redis-server`` (Debian package redis-server) on a free loopback port."""
    from tests.redis_server import running_redis

    with running_redis(tmp_path / "redis") as server:
        yield server
