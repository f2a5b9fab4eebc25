"""One FLM gateway in front of an OpenAI-kind engine (the vLLM emulator) and an Ollama-kind
one, with a key and an alias, for the client-library compatibility suite."""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from flm.testing.emulators import start_emulator
from flm.testing.gateway import start_gateway

# litellm fetches a model price list from the network at import unless told to use its own
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

#: Model names per engine kind: the chat model's plain name is unique to its engine.
CHAT = {"openai": "qwen-chat", "ollama": "llama3.2:1b"}
EMBED = {"openai": "bge-embed-small", "ollama": "nomic-embed-text:v1"}
ALIAS = "gpt-4o-mini"


@dataclass
class Flm:
    url: str
    key: str
    #: engine kind ("openai" = the vLLM emulator, "ollama") → engine id
    engines: dict[str, str]

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def model(self, kind: str, name: str | None = None) -> str:
        return f"flm://{self.engines[kind]}/{name or CHAT[kind]}"


@pytest.fixture(autouse=True)
def _collect_library_garbage() -> Iterator[None]:
    """Client libraries (not FLM) leave event loops and sockets to the garbage collector;
    collect them after each test here, so that their ResourceWarnings do not fail whichever
    test the collector happens to run in next. FLM's own tests keep them errors."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def flm(cli: Any) -> Iterator[Flm]:
    from flm.testing.emulators import ModelSpec

    with (
        start_emulator(
            "vllm", models=[CHAT["openai"], ModelSpec(EMBED["openai"], embeddings=True)]
        ) as vl,
        start_emulator("ollama", models=[CHAT["ollama"], EMBED["ollama"]]) as ol,
    ):
        assert cli("engines", "add", "--kind", "vllm", "--url", vl.url, "--id", "vl").code == 0
        assert cli("engines", "add", "--kind", "ollama", "--url", ol.url, "--id", "ol").code == 0
        assert cli("models", "alias", "set", ALIAS, "flm://vl/qwen-chat").code == 0
        key = cli("api-keys", "create", "--label", "compat").data["key"]
        with start_gateway() as gw:
            yield Flm(gw.url, key, {"openai": "vl", "ollama": "ol"})
