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
    except ProcessLookupError:
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


def read_daemon_file(path: Path) -> DaemonInfo | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return DaemonInfo(
            int(data["port"]), str(data["token"]), int(data["pid"]), str(data["started_at"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_daemon(paths: Paths) -> DaemonInfo | None:
    """The daemon described by the run file if its process is alive, else ``None``."""
    info = read_daemon_file(paths.daemon_file)
    if info is None or not pid_alive(info.pid):
        return None
    return info
