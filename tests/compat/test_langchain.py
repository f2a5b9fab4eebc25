"""``langchain-openai`` against FLM: ChatOpenAI (plain, streamed, tools, structured output),
OpenAIEmbeddings and the legacy-completions ``OpenAI`` LLM."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAI, OpenAIEmbeddings
from pydantic import BaseModel

from flm.testing.emulators import EMBEDDING_DIM, expected_reply
from tests.compat.conftest import ALIAS, CHAT, EMBED, Flm

KINDS = ["openai", "ollama"]


class City(BaseModel):
    name: str
    population: int


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """The HTTP client the langchain objects use, closed after the test (without one,
    langchain-openai keeps a client per base URL in a module-level cache, and its pooled
    connection stays open until the interpreter exits)."""
    with httpx.Client() as client:
        yield client


def _chat(flm: Flm, model: str, http: httpx.Client) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=flm.base_url,
        api_key=flm.key,
        model=model,  # type: ignore[arg-type]
        max_retries=0,
        http_client=http,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_chat_stream_tools_and_structured(flm: Flm, kind: str, http: httpx.Client) -> None:
    chat = _chat(flm, CHAT[kind], http)
    assert chat.invoke("hello langchain").content == expected_reply("hello langchain")
    assert "".join(str(c.content) for c in chat.stream("stream please")) == expected_reply(
        "stream please"
    )
    auto = chat.bind_tools([get_weather]).invoke("call get_weather for Rome")
    assert auto.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    assert auto.tool_calls[0]["args"] == {"city": "text"}  # type: ignore[attr-defined]
    forced = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("get_weather, Lima")
    assert forced.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    city = chat.with_structured_output(City).invoke("the largest city in Peru")
    assert city == City(name="text", population=1)


def test_alias_and_plain_name(flm: Flm, http: httpx.Client) -> None:
    assert _chat(flm, ALIAS, http).invoke("via alias").content == expected_reply("via alias")
    by_id = _chat(flm, flm.model("ollama"), http).invoke("by id")
    assert by_id.content == expected_reply("by id")


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings_and_legacy_completions(flm: Flm, kind: str, http: httpx.Client) -> None:
    # (check_embedding_ctx_length would tokenise with tiktoken, which downloads its tables)
    embed = OpenAIEmbeddings(
        base_url=flm.base_url,
        api_key=flm.key,  # type: ignore[arg-type]
        model=EMBED[kind],
        check_embedding_ctx_length=False,
        max_retries=0,
        http_client=http,
    )
    vectors = embed.embed_documents(["a", "b"])
    assert [len(v) for v in vectors] == [EMBEDDING_DIM, EMBEDDING_DIM]
    llm = OpenAI(
        base_url=flm.base_url,
        api_key=flm.key,
        model=CHAT[kind],  # type: ignore[arg-type]
        max_retries=0,
        http_client=http,
    )
    assert llm.invoke("once upon") == expected_reply("once upon")
