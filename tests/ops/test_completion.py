"""`flm completion bash|zsh|fish`: scripts generated from the parser, loaded by a real bash."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import flm_subprocess


def _flm_shim(tmp_path: Path) -> Path:
    """A directory with an ``flm`` executable running this checkout (for dynamic values)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "flm"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m flm "$@"\n')
    shim.chmod(0o755)
    return bindir


def _complete(script: str, words: list[str], bindir: Path) -> list[str]:
    """Source ``script`` in bash, set COMP_WORDS/COMP_CWORD for ``words`` and call the
    function registered for ``flm``; COMPREPLY, one per line."""
    driver = (
        'source "$1"\n'
        'fn=$(complete -p flm | sed -E "s/.*-F ([^ ]+).*/\\1/")\n'
        "shift\n"
        'COMP_WORDS=("$@")\n'
        "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
        'COMP_LINE="${COMP_WORDS[*]}"\n'
        "COMP_POINT=${#COMP_LINE}\n"
        '"$fn" flm "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    path = bindir.parent / "completion.bash"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", driver, "drive", str(path), *words],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


@pytest.fixture
def bash_script() -> str:
    proc = flm_subprocess("completion", "bash")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_bash_script_loads_with_process_substitution(tmp_path: Path) -> None:
    bindir = _flm_shim(tmp_path)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", "source <(flm completion bash) && complete -p flm"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "flm" in proc.stdout and "-F" in proc.stdout


def test_bash_completes_subcommands(bash_script: str, tmp_path: Path) -> None:
    bindir = _flm_shim(tmp_path)
    assert _complete(bash_script, ["flm", "api-keys", "re"], bindir) == ["revoke"]
    assert _complete(bash_script, ["flm", "api-keys", "ro"], bindir) == ["rotate"]
    top = _complete(bash_script, ["flm", "secu"], bindir)
    assert top == ["security"]
    assert sorted(_complete(bash_script, ["flm", "se"], bindir)) == [
        "secrets",
        "security",
        "service",
    ]


def test_bash_completes_key_ids_dynamically(bash_script: str, tmp_path: Path, cli: Any) -> None:
    first = cli("api-keys", "create", "--label", "a").data["id"]
    second = cli("api-keys", "create", "--label", "b").data["id"]
    cli("api-keys", "revoke", second)
    bindir = _flm_shim(tmp_path)
    got = _complete(bash_script, ["flm", "api-keys", "revoke", ""], bindir)
    assert got == [first]  # revoked keys are not offered
    assert _complete(bash_script, ["flm", "api-keys", "revoke", first[:3]], bindir) == [first]


def test_values_read_engines_and_ports(cli: Any) -> None:
    cli("engines", "add", "--kind", "vllm", "--url", "http://127.0.0.1:9", "--id", "gpu1")
    proc = flm_subprocess("completion", "values", "engines")
    assert proc.returncode == 0 and proc.stdout.split() == ["gpu1"]
    proc = flm_subprocess("completion", "values", "ports")
    assert proc.returncode == 0 and proc.stdout == ""


def test_zsh_and_fish_scripts(tmp_path: Path) -> None:
    zsh = flm_subprocess("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef flm")
    assert "_flm_keys" in zsh.stdout and "revoke" in zsh.stdout
    fish = flm_subprocess("completion", "fish")
    assert fish.returncode == 0
    assert (
        "complete -c flm -n '__fish_seen_subcommand_from api-keys; and not "
        "__fish_seen_subcommand_from create" in fish.stdout
    )
    assert "revoke rotate" in fish.stdout and "-a 'revoke'" in fish.stdout
    assert "(flm completion values keys 2>/dev/null)" in fish.stdout
    if shutil.which("zsh"):
        proc = subprocess.run(
            ["zsh", "-n", "-c", zsh.stdout], capture_output=True, text=True, check=False, timeout=30
        )
        assert proc.returncode == 0, proc.stderr
    if shutil.which("fish"):
        proc = subprocess.run(
            ["fish", "--no-execute", "-c", fish.stdout],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr


def test_help_stays_fast() -> None:
    """Completion support must not make `flm --help` slow (shtab is imported only when a
    script is generated)."""
    code = (
        "import sys, flm.cli; flm.cli.build_parser(); print(sorted({'shtab'} & set(sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    # CPU time, not wall time: the machine running the tests may be busy with other work
    best = min(_help_cpu_seconds() for _ in range(3))
    assert best < 0.3, f"flm --help took {best:.3f} s of CPU"


def _help_cpu_seconds() -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "flm", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
