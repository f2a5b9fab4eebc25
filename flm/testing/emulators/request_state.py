"""The state of the request being served, per asyncio task: the `Behaviour` snapshot taken
when it arrived, whether the emulator dropped its connection on purpose, how long it waited
for a loading model."""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass

from flm.testing.emulators.settings import Behaviour


@dataclass
class RequestState:
    behaviour: Behaviour
    dropped: bool = False
    load_wait_ns: int = 0


CURRENT: contextvars.ContextVar[RequestState] = contextvars.ContextVar("flm_emulator_request")


def request_behaviour() -> Behaviour:
    """The behaviour snapshot taken when the current request arrived."""
    return CURRENT.get().behaviour


def request_load_wait_ns() -> int:
    """How long the current request waited for a loading model, in nanoseconds."""
    return CURRENT.get().load_wait_ns


async def hang_forever() -> None:
    await asyncio.get_running_loop().create_future()
