"""``pydantic-ai`` agents against FLM: text, streamed text, function tools, structured output
(tool output where the engine honours forced tool calls, native JSON-schema output on both)."""

from __future__ import annotations

import asyncio

import openai
import pytest
from pydantic import BaseModel
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from flm.testing.emulators import expected_reply
from tests.compat.conftest import ALIAS, CHAT, Flm

KINDS = ["openai", "ollama"]


class City(BaseModel):
    name: str
    population: int


def _model(client: openai.AsyncOpenAI, name: str) -> OpenAIChatModel:
    return OpenAIChatModel(name, provider=OpenAIProvider(openai_client=client))


@pytest.mark.parametrize("kind", KINDS)
def test_agent_text_stream_tools_and_native_output(flm: Flm, kind: str) -> None:
    calls: list[str] = []

    async def scenario() -> None:
        async with openai.AsyncOpenAI(
            base_url=flm.base_url, api_key=flm.key, max_retries=0
        ) as client:
            agent = Agent(_model(client, CHAT[kind]))
            assert (await agent.run("hello agent")).output == expected_reply("hello agent")
            async with agent.run_stream("stream agent") as run:
                text = "".join([piece async for piece in run.stream_text(delta=True)])
            assert text == expected_reply("stream agent")
            tooled = Agent(_model(client, CHAT[kind]))

            @tooled.tool_plain
            def get_weather(city: str) -> str:
                """The weather in a city."""
                calls.append(city)
                return "sunny"

            result = await tooled.run("ask get_weather about Oslo")
            assert calls == ["text"]  # the tool ran with the model's arguments
            assert result.output  # and the model answered after seeing its result
            native = Agent(_model(client, CHAT[kind]), output_type=NativeOutput(City))
            assert (await native.run("a city")).output == City(name="text", population=1)

    asyncio.run(scenario())


def test_tool_output_by_alias(flm: Flm) -> None:
    # pydantic-ai's default structured output is a tool the model must call (tool_choice
    # required): the OpenAI-kind engine honours that
    async def scenario() -> None:
        async with openai.AsyncOpenAI(
            base_url=flm.base_url, api_key=flm.key, max_retries=0
        ) as client:
            agent = Agent(_model(client, ALIAS), output_type=City)
            assert (await agent.run("a city")).output == City(name="text", population=1)

    asyncio.run(scenario())
