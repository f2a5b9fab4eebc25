"""The managed engine: a llama-server FLM starts itself (SPEC §3.3)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flm.core.errors import EngineInstallError, EngineNotFoundError, UsageError
from flm.core.paths import ensure_private_dir
from flm.core.ports import free_port
from flm.services.engines import EngineService
from flm.services.runstate import pid_alive
from flm.storage import Storage
from flm.storage.config_db import EngineRow, EnginesRepo


class ManagedEngines:
    def __init__(self, storage: Storage, engines: EngineService) -> None:
        self._storage = storage
        self._engines = engines

    def start(
        self,
        model: str,
        port: int | None = None,
        *,
        embeddings: bool = False,
        progress: Callable[[str], None] | None = None,
        timeout_s: float = 180.0,
    ) -> dict[str, Any]:
        from flm.engines import managed_runtime as runtime

        say = progress or (lambda _msg: None)
        binary = runtime.find_llama_server()
        if binary is None:
            raise EngineInstallError(
                "llama-server is not installed; run `bash scripts/install-engine` or "
                "`flm engines install llamacpp` first"
            )
        if model == "demo":
            say("preparing the demo model (SmolLM2-135M-Instruct)")
            model_path = runtime.demo_model_path()
        else:
            model_path = Path(model).expanduser()
            if not model_path.is_file():
                raise UsageError(f"model file {model} does not exist")
        same = self._running_with(model_path, port, embeddings)
        if same is not None:
            say(f"llama-server already serves {model_path.name} as {same.id}: reusing it")
            return {**self._describe(same, model_path), "reused": True}
        chosen = port if port is not None else free_port()
        logs = ensure_private_dir(self._storage.paths.logs_dir)
        log_path = logs / f"llama-server-{chosen}.log"
        fd = os.open(log_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        # A key of its own, so that only FLM can use the engine (llama-server answers every
        # origin; without a key any web page open on this machine could call it).
        engine_key = secrets.token_urlsafe(32)
        with os.fdopen(fd, "ab") as log:
            extra = ["--embeddings", "--pooling", "mean"] if embeddings else []
            proc = runtime.spawn_llama_server(
                binary, model_path, "127.0.0.1", chosen, extra, log=log, api_key=engine_key
            )
        say(f"starting llama-server on 127.0.0.1:{chosen} (loading {model_path.name})")
        try:
            seconds = runtime.wait_until_healthy(proc, "127.0.0.1", chosen, timeout=timeout_s)
        except BaseException:
            runtime.stop_process(proc)
            raise EngineInstallError(
                f"llama-server did not become healthy; see {log_path}"
            ) from None
        row = self._engines.add(
            "llamacpp",
            f"http://127.0.0.1:{chosen}",
            None,
            managed=True,
            pid=proc.pid,
            model_path=str(model_path),
            api_key=engine_key,
        )
        return {
            **self._describe(row, model_path),
            "ready_after_s": round(seconds, 2),
            "log": str(log_path),
            "reused": False,
        }

    @staticmethod
    def _describe(row: EngineRow, model_path: Path) -> dict[str, Any]:
        return {
            "id": row.id,
            "base_url": row.base_url,
            "pid": row.pid,
            "model": model_path.stem,
            "model_id": f"flm://{row.id}/{model_path.stem}",
            "model_path": str(model_path),
        }

    def _running_with(
        self, model_path: Path, port: int | None, embeddings: bool
    ) -> EngineRow | None:
        """A managed llama-server of this FLM home that is alive and serves ``model_path``
        (on ``port``, when one was asked for; with embeddings on exactly when asked for):
        starting the same again reuses it. The process's command line must name the model,
        so a pid the system has given to another program since is never taken for it."""
        from urllib.parse import urlsplit

        import psutil

        wanted = str(model_path.resolve())
        for row in EnginesRepo(self._storage.config).all():
            if not row.managed or not row.pid or not pid_alive(row.pid) or not row.model_path:
                continue
            if str(Path(row.model_path).resolve()) != wanted:
                continue
            if port is not None and urlsplit(row.base_url).port != port:
                continue
            try:
                command = psutil.Process(row.pid).cmdline()
            except (psutil.Error, OSError):
                continue
            if row.model_path not in command or ("--embeddings" in command) != embeddings:
                continue
            return row
        return None

    def stop(self, engine_id: str) -> dict[str, Any]:
        row = EnginesRepo(self._storage.config).get(engine_id)
        if row is None or not row.managed:
            raise EngineNotFoundError(f"no managed engine with id {engine_id!r}")
        stopped = False
        if row.pid and pid_alive(row.pid):
            _signal_group(row.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(row.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid_alive(row.pid):
                _signal_group(row.pid, signal.SIGKILL)
            stopped = True
        self._engines.remove(engine_id)
        return {"id": engine_id, "pid": row.pid, "stopped": stopped}

    def running(self) -> list[dict[str, Any]]:
        return [
            {
                "id": r.id,
                "base_url": r.base_url,
                "pid": r.pid,
                "model_path": r.model_path,
                "alive": bool(r.pid and pid_alive(r.pid)),
            }
            for r in EnginesRepo(self._storage.config).all()
            if r.managed
        ]


def _signal_group(pid: int, sig: int) -> None:
    """llama-server runs in its own session (process group = its pid); signal the group."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
