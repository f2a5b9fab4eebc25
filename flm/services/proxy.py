"""Talking to the proxy daemon: start it detached, call its admin API, clean stale state."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from flm.core.errors import FlmError, InternalError, ProxyError
from flm.core.paths import Paths, ensure_private_dir
from flm.services.runstate import (
    DaemonInfo,
    daemon_alive,
    pid_alive,
    read_daemon_file,
    running_daemon,
)
from flm.storage import Storage
from flm.storage.config_db import ProxyHandleRow, ProxyHandlesRepo

START_TIMEOUT_S = 15.0
#: How long ``proxy start`` and ``proxy renew`` wait for the daemon: an ACME order may take 90 s
#: (plus the egress probe and the server start).
LONG_CALL_TIMEOUT_S = 150.0


def _dns_wait_s(storage: Storage, profile: str | None = None) -> float:
    """DNS-01 adds the propagation wait of its profile (of the slowest profile when unknown)."""
    try:
        from flm.services.dns_secrets import DnsSecretsService

        profiles = DnsSecretsService(storage).list()
    except Exception:
        return 0.0
    waits = [p.propagation_timeout_s for p in profiles if profile is None or p.name == profile]
    return max(waits, default=0.0)


class ProxyService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.paths: Paths = storage.paths

    # --- state -----------------------------------------------------------------------------------

    def cleanup_stale(self) -> dict[str, Any]:
        """Remove a run file whose daemon is dead and handles whose process is gone."""
        removed_file = False
        info = read_daemon_file(self.paths.daemon_file)
        if self.paths.daemon_file.exists() and (info is None or not daemon_alive(self.paths, info)):
            self.paths.daemon_file.unlink(missing_ok=True)
            removed_file = True
        repo = ProxyHandlesRepo(self._storage.config)
        stale = [h.id for h in repo.all() if not pid_alive(h.pid)]
        if stale:
            repo.remove(stale)
        return {"removed_daemon_file": removed_file, "removed_handles": stale}

    def daemon(self) -> DaemonInfo | None:
        return running_daemon(self.paths)

    # --- admin API -------------------------------------------------------------------------------

    def call(
        self, info: DaemonInfo, method: str, path: str, body: Any = None, timeout: float = 30.0
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{info.port}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {info.token}", "Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=timeout) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read())
            except ValueError:
                raise InternalError(f"daemon answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ProxyError(
                f"cannot reach the proxy daemon: {exc}", code="PROXY_NOT_RUNNING"
            ) from None
        if "error" in payload:
            err = payload["error"]
            raise FlmError(
                str(err.get("message")), code=str(err.get("code")), details=err.get("details")
            )
        return payload.get("data")

    def ensure_daemon(self) -> DaemonInfo:
        info = self.daemon()
        if info is not None:
            return info
        self.cleanup_stale()
        ensure_private_dir(self.paths.logs_dir)
        env = {
            **os.environ,
            "FLM_HOME": str(self.paths.home),
            "FLM_DB_PATH_CONFIG": str(self.paths.config_db),
            "FLM_DB_PATH_SECURITY": str(self.paths.security_db),
        }
        log_path = self.paths.logs_dir / "daemon.log"
        fd = os.open(log_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flm.daemon"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fd,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(fd)
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.01
        while time.monotonic() < deadline:
            info = read_daemon_file(self.paths.daemon_file)
            if info is not None and info.pid == proc.pid:
                try:
                    self.call(info, "GET", "/admin/health", timeout=2)
                    return info
                except FlmError:
                    pass
            code = proc.poll()
            if code is not None:
                other = self.daemon()
                if other is not None:  # another CLI started one at the same moment
                    return other
                raise ProxyError(f"the proxy daemon exited at start (code {code}); see {log_path}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)
        proc.kill()
        raise ProxyError(
            f"the proxy daemon did not start within {START_TIMEOUT_S:.0f} s; see {log_path}"
        )

    # --- commands -----------------------------------------------------------------------------

    def start(self, config: dict[str, Any]) -> dict[str, Any]:
        wait = LONG_CALL_TIMEOUT_S
        if config.get("challenge") == "dns-01" and config.get("dns_profile"):
            wait += _dns_wait_s(self._storage, str(config["dns_profile"]))
        info = self.ensure_daemon()
        self._same_databases(info)
        try:
            result: dict[str, Any] = self.call(info, "POST", "/admin/start", config, timeout=wait)
        except ProxyError as exc:
            if exc.code != "PROXY_NOT_RUNNING":
                raise
            # The daemon was going away (its last proxy had just been stopped): once it is
            # gone, a new one takes the start.
            self._wait_exit(info)
            info = self.ensure_daemon()
            self._same_databases(info)
            result = self.call(info, "POST", "/admin/start", config, timeout=wait)
        return result

    def _same_databases(self, info: DaemonInfo) -> None:
        """Refuse a start whose ``--db-path-*`` differ from the running daemon's: its proxies
        would silently use the daemon's databases (keys, policy and audit of another store)."""
        mine = {
            "config": os.path.abspath(self.paths.config_db),
            "security": os.path.abspath(self.paths.security_db),
        }
        theirs = {"config": info.config_db, "security": info.security_db}
        for name, path in mine.items():
            other = theirs[name]
            if other is not None and other != path:
                raise ProxyError(
                    f"the running proxy daemon uses the {name} database {other}, not {path}; "
                    "stop its proxies first (`flm proxy stop --all`) or drop --db-path-"
                    f"{name}",
                    code="PROXY_INVALID_CONFIG",
                )

    def renew(self, port: int | None = None, *, force: bool = True) -> dict[str, Any]:
        """Renew TLS certificates in running proxies (without restarting them)."""
        info = self.daemon()
        if info is None:
            raise ProxyError("no proxy is running", code="PROXY_NOT_RUNNING")
        result: dict[str, Any] = self.call(
            info,
            "POST",
            "/admin/renew",
            {"port": port, "force": force},
            timeout=LONG_CALL_TIMEOUT_S + _dns_wait_s(self._storage),
        )
        return result

    def status(self) -> dict[str, Any]:
        """The daemon and its proxies, and ``--no-daemon`` proxies (``foreground: true``)."""
        info = self.daemon()
        foreground = [_handle_row(h) for h in self.foreground_handles()]
        if info is None:
            cleaned = self.cleanup_stale()
            return {"daemon": None, "proxies": foreground, "cleaned": cleaned}
        data: dict[str, Any] = self.call(info, "GET", "/admin/status")
        return {
            "daemon": {"pid": info.pid, "admin_port": info.port, "started_at": info.started_at},
            "proxies": [*data["proxies"], *foreground],
        }

    def foreground_handles(self) -> list[ProxyHandleRow]:
        """Live ``--no-daemon`` proxies: handles of FLM processes other than the daemon."""
        info = self.daemon()
        daemon_pid = info.pid if info is not None else None
        return [
            h
            for h in ProxyHandlesRepo(self._storage.config).all()
            if h.pid != daemon_pid and _is_flm_process(h.pid, h.started_at)
        ]

    def stop(
        self, *, port: int | None = None, handle_id: str | None = None, all_: bool = False
    ) -> dict[str, Any]:
        """Stop the chosen proxies: the daemon's through its admin API, ``--no-daemon`` ones
        with SIGTERM (their graceful stop). Naming a port or handle nothing runs on is an
        error (exit 1), so a script learns that its proxy was not there."""
        import signal

        info = self.daemon()
        # (read before the daemon stops: a handle it could not remove names its own pid, which
        # is still alive for a moment after it let go of its lock — that is not a foreground one)
        foreground = self.foreground_handles()
        stopped: list[str] = []
        result: dict[str, Any] = {}
        if info is not None:
            body = {"port": port, "handle_id": handle_id, "all": all_}
            result = self.call(info, "POST", "/admin/stop", body)
            stopped += result.get("stopped") or []
            status = self._status(info)
            # a daemon left without proxies exits, unless a web UI session keeps it up
            if (all_ or not status.get("proxies")) and not status.get("ui_live"):
                self._wait_exit(info)
        for handle in foreground:
            if handle.id in stopped:
                continue
            if all_ or handle.port == port or handle.id == handle_id:
                with contextlib.suppress(OSError):
                    os.kill(handle.pid, signal.SIGTERM)
                    stopped.append(handle.id)
                    self._wait_pid(handle.pid)
        result["stopped"] = stopped
        if info is None:
            result["cleaned"] = self.cleanup_stale()
        if not stopped and not all_:
            target = f"port {port}" if port is not None else f"handle {handle_id}"
            raise ProxyError(
                f"no FLM proxy runs on {target} (see `flm proxy status`)", code="PROXY_NOT_RUNNING"
            )
        return result

    @staticmethod
    def _wait_pid(pid: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _status(self, info: DaemonInfo) -> dict[str, Any]:
        try:
            status: dict[str, Any] = self.call(info, "GET", "/admin/status", timeout=5)
            return status
        except FlmError:
            return {}

    def _wait_exit(self, info: DaemonInfo, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while daemon_alive(self.paths, info) and time.monotonic() < deadline:
            time.sleep(0.02)

    def reload(self, port: int | None = None) -> dict[str, Any]:
        info = self.daemon()
        reloaded: list[str] = []
        if info is not None:
            body: dict[str, Any] = {"port": port}
            if os.environ.get("FLM_LOG_LEVEL"):
                body["log_level"] = os.environ["FLM_LOG_LEVEL"]
            reloaded += self.call(info, "POST", "/admin/reload", body)["reloaded"]
        reloaded += self._signal_foreground(port)
        return {"reloaded": reloaded}

    def notify_reload(self) -> None:
        """Best effort: tell running proxies (the daemon's, and ``--no-daemon`` ones) that
        keys, policy or engines changed, so a revoked key is refused at once."""
        info = self.daemon()
        if info is not None:
            with contextlib.suppress(FlmError):
                self.call(info, "POST", "/admin/reload", {}, timeout=5)
        self._signal_foreground(None)

    def _signal_foreground(self, port: int | None) -> list[str]:
        """SIGHUP to each live ``--no-daemon`` proxy (its handle, not the daemon's), which
        reloads on it. A handle's pid is trusted only if that process is FLM's and started
        before the handle was written: a pid the system gave to another program since gets
        no signal."""
        import signal

        hup = getattr(signal, "SIGHUP", None)
        info = self.daemon()
        daemon_pid = info.pid if info is not None else None
        signalled = []
        for handle in ProxyHandlesRepo(self._storage.config).all():
            if handle.pid == daemon_pid or (port is not None and handle.port != port):
                continue
            if hup is None or not _is_flm_process(handle.pid, handle.started_at):
                continue
            try:
                os.kill(handle.pid, hup)
            except OSError:
                continue
            signalled.append(handle.id)
        return signalled


def _is_flm_process(pid: int, started_at: str) -> bool:
    """Whether ``pid`` is a Python process running FLM that began before ``started_at``."""
    import psutil

    from flm.core.timeutil import parse_iso

    try:
        proc = psutil.Process(pid)
        began = proc.create_time()
        command = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False
    try:
        written = parse_iso(started_at).timestamp()
    except ValueError:
        return False
    return "flm" in command and began <= written + 1.0


def _handle_row(handle: ProxyHandleRow) -> dict[str, Any]:
    """A ``--no-daemon`` proxy in the shape of the daemon's status rows."""
    from flm.core.timeutil import parse_iso

    scheme = "http" if handle.mode == "local-http" else "https"
    port = handle.https_port or handle.port
    wildcard = handle.bind in ("0.0.0.0", "::", "localhost")  # noqa: S104
    host = "127.0.0.1" if wildcard else handle.bind
    host = f"[{host}]" if ":" in host else host
    try:
        uptime = round(time.time() - parse_iso(handle.started_at).timestamp(), 1)
    except ValueError:
        uptime = None
    return {
        "id": handle.id,
        "mode": handle.mode,
        "port": handle.port,
        "https_port": handle.https_port,
        "listen": handle.bind,
        "endpoints": [f"{scheme}://{host}:{port}"],
        "egress": {},
        "uptime_s": uptime,
        "pid": handle.pid,
        "started_at": handle.started_at,
        "certificate_expiry": None,
        "last_error": None,
        "foreground": True,
        "workers": _foreground_workers(handle.pid),
    }


def _foreground_workers(pid: int) -> list[dict[str, Any]] | None:
    """A ``--no-daemon --workers N`` proxy's processes: itself and its ``flm.proxy.worker``
    children (their request and restart counts live in that process: None here)."""
    import psutil

    try:
        children = [
            c.pid
            for c in psutil.Process(pid).children()
            if "flm.proxy.worker" in " ".join(c.cmdline())
        ]
    except (psutil.Error, OSError):
        return None
    if not children:
        return None
    rows = [{"index": 0, "pid": pid, "alive": True, "role": "supervisor"}]
    rows += [
        {"index": i, "pid": child, "alive": True, "role": "worker"}
        for i, child in enumerate(sorted(children), start=1)
    ]
    for row in rows:
        row.update(served=None, restarts=None, started_at=None, last_exit=None)
    return rows
