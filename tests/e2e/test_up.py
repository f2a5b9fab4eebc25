"""``flm up`` on a machine with no engine running: the managed demo model answers through the
proxy with the printed key (needs llama-server: scripts/install-engine)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest

from tests.conftest import flm_subprocess
from tests.support import free_port


def _llama_available() -> bool:
    from flm.engines.managed_runtime import find_llama_server

    try:
        return find_llama_server() is not None
    except Exception:
        return False


@pytest.fixture
def llama() -> None:
    if not _llama_available():
        if os.environ.get("CI") == "true":
            pytest.fail("llama-server is missing in CI: scripts/install-engine must run first")
        pytest.skip("llama-server not installed: run `bash scripts/install-engine`")


@pytest.fixture
def clean_up(flm_home: Path) -> Iterator[None]:
    yield
    flm_subprocess("proxy", "stop", "--all")
    engines = json.loads(flm_subprocess("engines", "list").stdout)["data"]
    for engine in engines:
        if engine["source"] == "managed":
            flm_subprocess("engines", "stop", engine["id"])


@pytest.mark.engine
def test_up_serves_the_demo_model(llama: None, clean_up: None) -> None:
    port = free_port()
    result = flm_subprocess("up", "--port", str(port), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)["data"]
    assert data["key"] and data["key"] in data["curl"]
    assert data["url"] == f"http://localhost:{port}"
    assert data["model"].startswith("flm://")
    with openai.OpenAI(
        base_url=data["base_url"], api_key=data["key"], max_retries=0, timeout=120
    ) as client:
        assert data["model"] in {m.id for m in client.models.list()}
        reply = client.chat.completions.create(
            model=data["model"],
            max_tokens=24,
            messages=[{"role": "user", "content": "Say hello in three words."}],
        )
        assert (reply.choices[0].message.content or "").strip()
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        text = ""
        for chunk in client.chat.completions.create(
            model=data["model"],
            max_tokens=24,
            stream=True,
            messages=[{"role": "user", "content": "Count to five."}],
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        assert text.strip()
        # a second `flm up` reuses everything and does not print a new key
        again = flm_subprocess("up", timeout=120)
        assert again.returncode == 0, again.stdout
        assert json.loads(again.stdout)["data"]["key"] is None


@pytest.mark.engine
def test_real_llama_embeddings_and_detection(llama: None, clean_up: None) -> None:
    started = flm_subprocess(
        "engines", "start", "llamacpp", "--model", "demo", "--embeddings", timeout=300
    )
    assert started.returncode == 0, started.stdout + started.stderr
    engine = json.loads(started.stdout)["data"]
    # (its port was chosen outside the kernel's ephemeral range: no outgoing connection could
    # take it before llama-server bound it)
    from flm.core.ports import outside_ephemeral_range

    outside = outside_ephemeral_range()
    assert not outside or urlsplit(engine["base_url"]).port in outside
    detected = json.loads(
        flm_subprocess("engines", "detect", "--engine", engine["id"], "--fresh").stdout
    )["data"]["engines"]
    assert detected[0]["status"] == "RunningHealthy"
    models = json.loads(flm_subprocess("models", "list", "--engine", engine["id"]).stdout)
    assert engine["model_id"] in {m["id"] for m in models["data"]["models"]}
    # the engine answers FLM only: without FLM's engine key, llama-server refuses
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(engine["base_url"] + "/v1/models", timeout=10)  # noqa: S310
    assert refused.value.code == 401
    refused.value.close()
    listed = json.loads(flm_subprocess("engines", "list").stdout)["data"]
    assert all("api_key" not in e for e in listed)
    key = json.loads(flm_subprocess("api-keys", "create", "--label", "e").stdout)["data"]["key"]
    port = free_port()
    assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120
    ) as client:
        emb = client.embeddings.create(model=engine["model_id"], input=["hello world"])
        assert len(emb.data[0].embedding) > 10


@pytest.mark.engine
def test_up_takes_the_next_port_when_busy(llama: None, clean_up: None) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        busy = blocker.getsockname()[1]
        result = flm_subprocess("up", "--port", str(busy), timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        data = json.loads(result.stdout)["data"]
    assert data["proxy"]["port"] != busy
    assert any(f"port {busy} was busy" in note for note in data["notes"])
    assert f"port {busy} was busy" in result.stderr


@pytest.mark.engine
def test_starting_the_same_model_twice_reuses_one_llama_server(
    llama: None, clean_up: None, flm_home: Path
) -> None:
    first = flm_subprocess("engines", "start", "llamacpp", "--model", "demo", timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    engine = json.loads(first.stdout)["data"]
    assert engine["reused"] is False
    again = flm_subprocess("engines", "start", "llamacpp", "--model", "demo", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    second = json.loads(again.stdout)["data"]
    assert second["reused"] is True
    assert (second["id"], second["pid"]) == (engine["id"], engine["pid"])
    managed = [
        e
        for e in json.loads(flm_subprocess("engines", "list").stdout)["data"]
        if e["source"] == "managed"
    ]
    assert [e["id"] for e in managed] == [engine["id"]]
    import psutil

    def home_of(process: psutil.Process) -> str | None:
        try:
            return process.environ().get("FLM_HOME")
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            return None

    # (this FLM home's servers: other FLM homes on a shared machine may serve the same model)
    servers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any("llama-server" in part for part in (p.info["cmdline"] or [])[:1])
        and engine["model_path"] in (p.info["cmdline"] or [])
        and home_of(p) == str(flm_home)
    ]
    assert [p.pid for p in servers] == [engine["pid"]]
