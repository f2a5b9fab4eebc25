"""Revoking a key while the daemon runs: the very next request with it is refused."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from flm.testing.emulators import start_emulator
from tests.conftest import flm_subprocess
from tests.support import free_port


def _get(url: str, key: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})  # noqa: S310
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_revoke_and_rotate_apply_immediately(flm_home: Path) -> None:
    port = free_port()
    with start_emulator("vllm", models=["m"]) as emu:
        flm_subprocess("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        created = json.loads(flm_subprocess("api-keys", "create", "--label", "k").stdout)["data"]
        assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
        try:
            url = f"http://127.0.0.1:{port}/v1/models"
            assert _get(url, created["key"]) == 200
            rotated = json.loads(flm_subprocess("api-keys", "rotate", created["id"]).stdout)
            new_key = rotated["data"]["key"]
            assert _get(url, created["key"]) == 401  # no restart, no wait
            assert _get(url, new_key) == 200
            flm_subprocess("api-keys", "revoke", rotated["data"]["id"])
            assert _get(url, new_key) == 401
        finally:
            flm_subprocess("proxy", "stop", "--all")


def _chat(url: str, key: str, model: str) -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(  # noqa: S310
        url,
        data=body.encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_engine_registrations_reach_the_running_daemon_at_once(flm_home: Path) -> None:
    port = free_port()
    created = json.loads(flm_subprocess("api-keys", "create", "--label", "k").stdout)["data"]
    assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with start_emulator("vllm", models=["fresh"]) as emu:
            added = flm_subprocess(
                "engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "new"
            )
            assert added.returncode == 0, added.stdout
            assert _chat(url, created["key"], "flm://new/fresh") == 200  # no reload, no wait
            assert flm_subprocess("engines", "remove", "new").returncode == 0
            assert _chat(url, created["key"], "flm://new/fresh") == 404
    finally:
        flm_subprocess("proxy", "stop", "--all")
