"""Where FLM keeps its files: one data directory, resolved once per process."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """``$FLM_HOME`` if set, else the operating system's convention for per-user config."""
    env = os.environ if env is None else env
    if env.get("FLM_HOME"):
        return Path(env["FLM_HOME"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "flm"
    if sys.platform == "win32":
        return Path(env.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "flm"
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "flm"


@dataclass(frozen=True)
class Paths:
    """Every path FLM uses, derived from the data directory and the two overrides."""

    home: Path
    config_db: Path
    security_db: Path

    @classmethod
    def resolve(
        cls,
        *,
        home: Path | None = None,
        config_db: str | Path | None = None,
        security_db: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Paths:
        root = home if home is not None else default_home(env)
        return cls(
            home=root,
            config_db=Path(config_db) if config_db else root / "config.db",
            security_db=Path(security_db) if security_db else root / "security.db",
        )

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def backups_dir(self) -> Path:
        return self.home / "backups"

    @property
    def certs_dir(self) -> Path:
        return self.home / "certs"

    @property
    def engines_dir(self) -> Path:
        return self.home / "engines"

    @property
    def daemon_file(self) -> Path:
        return self.run_dir / "proxy-daemon.json"


def ensure_private_dir(path: Path) -> Path:
    """An FLM-owned directory: create ``path`` (and parents) with mode 0700; tighten it if it
    already exists. Never for a directory the user named (``--output``, ``--db-path-*``):
    that may be shared, like ``/tmp`` — see :func:`make_dir`."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.name == "posix" and (path.stat().st_mode & 0o077):
        path.chmod(0o700)
    return path


def make_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing, mode 0700; an existing directory is left as it
    is (the files FLM writes into it are 0600 on their own)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def touch_private_file(path: Path) -> Path:
    """Create ``path`` with mode 0600 if missing (before anyone else can create it wider)."""
    make_dir(path.parent)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.close(fd)
    if os.name == "posix" and (path.stat().st_mode & 0o077):
        path.chmod(0o600)
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600."""
    make_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
