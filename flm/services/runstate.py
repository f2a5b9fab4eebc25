"""The daemon's run file (``run/proxy-daemon.json``) and process liveness checks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flm.core.paths import Paths


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import psutil

        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class DaemonInfo:
    port: int
    token: str
    pid: int
    started_at: str
    #: the databases the daemon's proxies use (absolute; None from an older run file)
    config_db: str | None = None
    security_db: str | None = None


def read_daemon_file(path: Path) -> DaemonInfo | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return DaemonInfo(
            int(data["port"]),
            str(data["token"]),
            int(data["pid"]),
            str(data["started_at"]),
            _opt_str(data.get("config_db")),
            _opt_str(data.get("security_db")),
        )
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def daemon_lock_held(paths: Paths) -> bool:
    """Whether a daemon is alive: it holds ``run/daemon.lock`` (an exclusive ``flock``) for its
    whole life, and the kernel drops the lock when it dies, however it dies. Unlike the run
    file's pid, this cannot be fooled by a pid the system has since given to another process.
    (The probe takes a shared lock for an instant; a daemon starting at that moment retries.)"""
    import fcntl

    try:
        fd = os.open(paths.run_dir / "daemon.lock", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: assume alive rather than remove a live daemon's file
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held by the daemon (or cannot tell: assume alive)
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def daemon_alive(paths: Paths, info: DaemonInfo) -> bool:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        return pid_alive(info.pid)
    return daemon_lock_held(paths)


def running_daemon(paths: Paths) -> DaemonInfo | None:
    """The daemon described by the run file if it is alive, else ``None``."""
    info = read_daemon_file(paths.daemon_file)
    if info is None or not daemon_alive(paths, info):
        return None
    return info
