"""The CLI for people: text on a terminal, JSON in a pipe; help, suggestions, examples; the
effective policy; tables that fit; honest exit codes."""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flm.cli import build_parser
from flm.cli.examples import walk
from flm.cli.output import TABLE_WIDTH, table
from tests.conftest import flm_subprocess
from tests.support import free_port


def _on_terminal(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``flm`` with standard output a pseudo-terminal; what it printed there."""
    leader, follower = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flm", *args],
            stdout=follower,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        os.close(follower)
        chunks: list[bytes] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail("flm did not finish on the terminal within 60 s")
        proc.wait(timeout=30)
    finally:
        os.close(leader)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_text_on_a_terminal_json_in_a_pipe() -> None:
    flm_subprocess("api-keys", "create", "--label", "laptop")
    shown = _on_terminal("api-keys", "list")
    lines = shown.strip().splitlines()
    assert lines[0].split()[:3] == ["ID", "LABEL", "STATUS"], shown
    assert set(lines[1]) <= {"-", " "}  # a table: header, rule, rows
    assert "laptop" in lines[2]
    piped = flm_subprocess("api-keys", "list")
    assert json.loads(piped.stdout)["data"][0]["label"] == "laptop"
    # --format and FLM_FORMAT choose explicitly
    assert json.loads(_on_terminal("api-keys", "list", "--format", "json"))["data"]
    assert json.loads(_on_terminal("api-keys", "list", env={"FLM_FORMAT": "json"}))["data"]
    text = flm_subprocess("api-keys", "list", env={"FLM_FORMAT": "text"}).stdout
    assert text.startswith("ID ")
    # errors too: a person reads a sentence, a program gets the JSON error
    assert _on_terminal("config", "get", "no.such").startswith("error [INVALID_ARGUMENT]")


def test_bare_flm_prints_help_and_typos_get_a_suggestion() -> None:
    bare = flm_subprocess()
    assert bare.returncode == 0 and bare.stdout.startswith("usage: flm")
    assert "COMMAND" in bare.stdout
    typo = flm_subprocess("modles", "list")
    assert typo.returncode != 0
    assert "did you mean `flm models`" in json.loads(typo.stdout)["error"]["message"]
    typo = flm_subprocess("api-keys", "lsit")
    assert "did you mean `flm api-keys list`" in json.loads(typo.stdout)["error"]["message"]


def test_every_command_help_has_an_example_that_parses() -> None:
    parser = build_parser()
    commands = walk(parser)
    assert len(commands) > 40
    for path, sub in commands:
        helptext = sub.format_help()
        assert "\nexample:\n  flm" in helptext, f"`flm {' '.join(path)} --help` has no example"
        example = helptext.split("\nexample:\n  ", 1)[1].splitlines()[0]
        argv = shlex.split(example)[1:]
        assert argv[: len(path)] == list(path), (path, example)
        if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            parsed = build_parser().parse_args(argv)  # a leaf: its example is a valid call
            assert getattr(parsed, "handler", None) is not None, example


def test_policy_show_fills_and_marks_defaults(cli: Any) -> None:
    assert cli("security", "policy", "set", stdin='{"ip_blocklist": {"max_failures": 7}}').code == 0
    shown = cli("security", "policy", "show")
    rows = {r["setting"]: r for r in shown.data["effective"]}
    assert rows["ip_blocklist.max_failures"] == {
        "setting": "ip_blocklist.max_failures",
        "loopback": 7,
        "exposed": 7,
        "source": "set",
    }
    assert rows["ip_blocklist.block_duration_minutes"]["source"] == "default"
    assert rows["ip_blocklist.block_duration_minutes"]["loopback"] == 30
    # protections default on only when the proxy is reachable from the network
    assert rows["intrusion_detection.enabled"]["loopback"] is False
    assert rows["intrusion_detection.enabled"]["exposed"] is True
    text = cli("security", "policy", "show", "--format", "text").out
    assert any("max_failures" in line and "(default)" not in line for line in text.splitlines())
    assert any(
        "block_duration_minutes" in line and "(default)" in line for line in text.splitlines()
    )
    assert shown.data["policy"] == {"ip_blocklist": {"max_failures": 7}}


def test_tables_fit_100_columns(cli: Any) -> None:
    rows = [
        {"id": "x" * 40, "url": "http://" + "h" * 90, "status": "RunningHealthy", "note": "n" * 70}
    ]
    lines = table(rows).splitlines()
    assert max(len(line) for line in lines) <= TABLE_WIDTH
    assert lines[2].split()[2] == "RunningHealthy"  # short columns are left whole
    cli("engines", "add", "--kind", "vllm", "--url", "http://" + "a" * 120 + ":8000")
    listed = cli("engines", "list", "--format", "text").out
    assert max(len(line) for line in listed.splitlines()) <= TABLE_WIDTH


def test_proxy_stop_on_a_free_port_exits_1(flm_home: Path) -> None:

    port = free_port()
    result = flm_subprocess("proxy", "stop", "--port", str(port))
    assert result.returncode == 1, result.stdout
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "PROXY_NOT_RUNNING" and str(port) in error["message"]
    assert flm_subprocess("proxy", "stop", "--all").returncode == 0  # nothing to stop: fine
