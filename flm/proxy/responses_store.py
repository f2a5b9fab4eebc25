"""Stored Responses (``store: true``, OpenAI's default): what ``previous_response_id``,
``GET``/``DELETE /v1/responses/{id}`` and ``…/input_items`` read.

Kept in the proxy's memory, never written to disk: storing costs the request a dict insert,
nothing waits on SQLite, and prompts never reach a file (FLM records no prompt anywhere). The
price: a restart forgets them, and each proxy has its own. Bounded twice: per API key (the
oldest of that key's responses goes first, so one key cannot push out another's) and in time
(``responses.retention_s``). Every read names the key: another key's response does not exist.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_RETENTION_S = 24 * 3600
DEFAULT_MAX_PER_KEY = 1000


@dataclass
class StoredResponse:
    response: dict[str, Any]
    #: The request's input as Responses items (each with an id), for ``input_items``.
    input_items: list[dict[str, Any]]
    #: The conversation in chat form up to and including this response's output (system
    #: instructions excluded: OpenAI does not carry them over to a follow-up).
    messages: list[dict[str, Any]]
    expires: float


class ResponseStore:
    def __init__(self, retention_s: float = DEFAULT_RETENTION_S,
                 max_per_key: int = DEFAULT_MAX_PER_KEY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retention_s = retention_s
        self.max_per_key = max_per_key
        self.clock = clock
        self._by_key: dict[str, OrderedDict[str, StoredResponse]] = {}

    def configure(self, retention_s: float, max_per_key: int) -> None:
        self.retention_s = retention_s
        self.max_per_key = max_per_key
        for key in list(self._by_key):
            self._trim(key)

    def put(self, key_id: str | None, response: dict[str, Any],
            input_items: list[dict[str, Any]], messages: list[dict[str, Any]]) -> None:
        owner = key_id or ""
        items = self._by_key.setdefault(owner, OrderedDict())
        items[str(response["id"])] = StoredResponse(response, input_items, messages,
                                                    self.clock() + self.retention_s)
        self._trim(owner)

    def get(self, key_id: str | None, response_id: str) -> StoredResponse | None:
        items = self._by_key.get(key_id or "")
        if items is None:
            return None
        hit = items.get(response_id)
        if hit is not None and hit.expires <= self.clock():
            del items[response_id]
            return None
        return hit

    def delete(self, key_id: str | None, response_id: str) -> bool:
        if self.get(key_id, response_id) is None:
            return False
        del self._by_key[key_id or ""][response_id]
        return True

    def __len__(self) -> int:
        return sum(len(items) for items in self._by_key.values())

    def _trim(self, owner: str) -> None:
        items = self._by_key[owner]
        while len(items) > self.max_per_key:
            items.popitem(last=False)
        now = self.clock()
        while items:  # oldest first: expired ones sit at the front
            first = next(iter(items.values()))
            if first.expires > now:
                break
            items.popitem(last=False)
        if not items:
            del self._by_key[owner]
