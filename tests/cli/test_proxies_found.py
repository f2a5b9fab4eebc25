"""`flm up` prints a curl line that works pasted into bash; `flm chat` and `proxy status` find
--no-daemon proxies; adding an engine URL twice reuses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flm.testing.emulators import expected_reply, start_emulator
from tests.conftest import flm_subprocess
from tests.support import free_port


def test_second_up_prints_a_curl_line_that_works_in_bash(flm_home: Path) -> None:
    with start_emulator("vllm", models=["qwen"]) as emu:
        flm_subprocess("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        port = free_port()
        try:
            first = flm_subprocess("up", "--port", str(port), timeout=120)
            assert first.returncode == 0, first.stdout + first.stderr
            key = json.loads(first.stdout)["data"]["key"]
            assert key
            ran = subprocess.run(
                ["bash", "-c", json.loads(first.stdout)["data"]["curl"]],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert json.loads(ran.stdout)["choices"][0]["message"]["content"] == expected_reply(
                "Hello!"
            )
            second = flm_subprocess("up", timeout=120)
            assert second.returncode == 0, second.stdout + second.stderr
            data = json.loads(second.stdout)["data"]
            assert data["key"] is None and "$FLM_API_KEY" in data["curl"]
            line = data["curl"] + " -o /dev/null -w '%{http_code}'"
            ran = subprocess.run(
                ["bash", "-c", line],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={**os.environ, "FLM_API_KEY": key},
            )
            assert ran.stdout == "200", ran.stdout + ran.stderr
        finally:
            flm_subprocess("proxy", "stop", "--all")


def test_chat_and_status_find_a_no_daemon_proxy(flm_home: Path) -> None:
    with start_emulator("ollama", models=["m:1"]) as emu:
        flm_subprocess("engines", "add", "--kind", "ollama", "--url", emu.url, "--id", "o")
        key = json.loads(flm_subprocess("api-keys", "create", "--label", "c").stdout)["data"]
        nothing = flm_subprocess(
            "chat", "--model", "m:1", "--prompt", "hi", "--api-key", key["key"]
        )
        assert nothing.returncode != 0
        assert json.loads(nothing.stdout)["error"]["code"] == "PROXY_NOT_RUNNING"
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "flm", "proxy", "start", "--no-daemon", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ),
        )
        try:
            deadline = time.monotonic() + 60
            proxies: list[Any] = []
            while not proxies:
                assert time.monotonic() < deadline, "the --no-daemon proxy never showed up"
                assert proc.poll() is None, "the --no-daemon proxy exited"
                status = json.loads(flm_subprocess("proxy", "status").stdout)["data"]
                proxies = [p for p in status["proxies"] if p["port"] == port]
                time.sleep(0.05)
            assert proxies[0]["foreground"] is True and proxies[0]["pid"] == proc.pid
            reply = flm_subprocess(
                "chat", "--model", "m:1", "--prompt", "hi there", "--api-key", key["key"]
            )
            assert reply.returncode == 0, reply.stdout
            assert json.loads(reply.stdout)["data"]["text"] == expected_reply("hi there")
            stopped = flm_subprocess("proxy", "stop", "--port", str(port))
            assert stopped.returncode == 0, stopped.stdout
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_adding_a_registered_url_again_reuses_it(cli: Any) -> None:
    first = cli("engines", "add", "--kind", "vllm", "--url", "http://127.0.0.1:8001")
    assert first.data["id"] == "vllm" and first.data["reused"] is False
    again = cli("engines", "add", "--kind", "vllm", "--url", "http://127.0.0.1:8001/")
    assert again.data["id"] == "vllm" and again.data["reused"] is True
    assert [r["id"] for r in cli("engines", "list").data if r["source"] == "registered"] == ["vllm"]
    other = cli("engines", "add", "--kind", "vllm", "--url", "http://127.0.0.1:8001", "--id", "gpu")
    assert other.code != 0 and "already registered as 'vllm'" in other.error["message"]
