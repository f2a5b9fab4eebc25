"""Gateway fixtures: an emulator registered as an engine, a key, the gateway on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from flm.testing.emulators import ModelSpec, start_emulator
from flm.testing.gateway import Gateway, start_gateway


class Stack:
    def __init__(self, emu: Any, gateway: Gateway, key: str, engine_id: str) -> None:
        self.emu = emu
        self.gateway = gateway
        self.key = key
        self.engine_id = engine_id
        self.url = gateway.url

    def model(self, name: str) -> str:
        return f"flm://{self.engine_id}/{name}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_stack(cli: Any, kind: str, models: list[Any]) -> Iterator[Stack]:
    with start_emulator(kind, models=models) as emu:
        assert cli("engines", "add", "--kind", kind, "--url", emu.url, "--id", "eng").code == 0
        key = cli("api-keys", "create", "--label", "test").data["key"]
        with start_gateway() as gw:
            yield Stack(emu, gw, key, "eng")


@pytest.fixture(params=["ollama", "vllm", "lmstudio"])
def stack(request: pytest.FixtureRequest, cli: Any) -> Iterator[Stack]:
    models = ["chat-model:1b", "nomic-embed-text:v1", ModelSpec("see:v1", vision=True)]
    yield from make_stack(cli, request.param, models)


@pytest.fixture
def vllm_stack(cli: Any) -> Iterator[Stack]:
    yield from make_stack(cli, "vllm", ["chat-model:1b"])
