"""Stored Responses (``store: true``, OpenAI's default): what ``previous_response_id``,
``GET``/``DELETE /v1/responses/{id}`` and ``…/input_items`` read.

Kept in the proxy's memory, never written to disk: storing costs the request a dict insert,
nothing waits on SQLite, and prompts never reach a file (FLM records no prompt anywhere). The
price: a restart forgets them, and each proxy has its own. Bounded per API key in count
(``responses.max_per_key``) and in size (``MAX_BYTES_PER_KEY`` of text, roughly measured) —
the oldest of that key's responses goes first, so one key cannot push out another's — and in
time (``responses.retention_s``). Every read names the key: another key's response does not exist.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_RETENTION_S = 24 * 3600
DEFAULT_MAX_PER_KEY = 1000
#: Text one key may keep stored (a conversation's earlier messages are shared between the
#: responses that continue it, but each is counted with every response that holds it).
MAX_BYTES_PER_KEY = 64 * 1024 * 1024


def approx_size(value: Any) -> int:
    """Characters of text in a JSON-like value, plus a little per node."""
    if isinstance(value, str):
        return len(value) + 8
    if isinstance(value, dict):
        return 16 + sum(len(str(k)) + approx_size(v) for k, v in value.items())
    if isinstance(value, list):
        return 16 + sum(approx_size(v) for v in value)
    return 8


@dataclass
class StoredResponse:
    response: dict[str, Any]
    #: The request's input as Responses items (each with an id), for ``input_items``.
    input_items: list[dict[str, Any]]
    #: The conversation in chat form up to and including this response's output (system
    #: instructions excluded: OpenAI does not carry them over to a follow-up).
    messages: list[dict[str, Any]]
    expires: float
    size: int = 0


class ResponseStore:
    def __init__(
        self,
        retention_s: float = DEFAULT_RETENTION_S,
        max_per_key: int = DEFAULT_MAX_PER_KEY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.retention_s = retention_s
        self.max_per_key = max_per_key
        self.clock = clock
        self._by_key: dict[str, OrderedDict[str, StoredResponse]] = {}
        self._bytes: dict[str, int] = {}
        self.max_bytes_per_key = MAX_BYTES_PER_KEY

    def configure(self, retention_s: float, max_per_key: int) -> None:
        self.retention_s = retention_s
        self.max_per_key = max_per_key
        for key in list(self._by_key):
            self._trim(key)

    def put(
        self,
        key_id: str | None,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        messages: list[dict[str, Any]],
    ) -> None:
        owner = key_id or ""
        size = approx_size(response) + approx_size(input_items) + approx_size(messages)
        if size > self.max_bytes_per_key:
            return  # larger than a key may keep at all: not stored
        items = self._by_key.setdefault(owner, OrderedDict())
        resp_id = str(response["id"])
        old = items.pop(resp_id, None)
        self._bytes[owner] = self._bytes.get(owner, 0) + size - (old.size if old else 0)
        items[resp_id] = StoredResponse(
            response, input_items, messages, self.clock() + self.retention_s, size
        )
        self._trim(owner)

    def get(self, key_id: str | None, response_id: str) -> StoredResponse | None:
        items = self._by_key.get(key_id or "")
        if items is None:
            return None
        hit = items.get(response_id)
        if hit is not None and hit.expires <= self.clock():
            self._drop(key_id or "", response_id)
            return None
        return hit

    def delete(self, key_id: str | None, response_id: str) -> bool:
        if self.get(key_id, response_id) is None:
            return False
        self._drop(key_id or "", response_id)
        return True

    def _drop(self, owner: str, response_id: str) -> None:
        items = self._by_key[owner]
        gone = items.pop(response_id)
        self._bytes[owner] -= gone.size
        if not items:
            del self._by_key[owner]
            del self._bytes[owner]

    def __len__(self) -> int:
        return sum(len(items) for items in self._by_key.values())

    def _trim(self, owner: str) -> None:
        items = self._by_key[owner]
        now = self.clock()
        while items:
            first_id, first = next(iter(items.items()))
            # oldest first: over a bound, or expired (expired ones sit at the front)
            if (
                len(items) <= self.max_per_key
                and first.expires > now
                and self._bytes[owner] <= self.max_bytes_per_key
            ):
                break
            self._drop(owner, first_id)
            if owner not in self._by_key:
                break
