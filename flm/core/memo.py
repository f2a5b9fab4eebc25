"""Bounded memos for the hot path: answers worth remembering, in tables that never grow
without bound."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(table: dict[K, V], key: K, value: V, limit: int = 4096) -> V:
    """Store ``value`` under ``key`` and return it. A full table is emptied first: clients
    repeat the same few keys, so a flood of distinct ones only costs a refill now and then,
    and memory stays bounded whatever they send."""
    if len(table) >= limit:
        table.clear()
    table[key] = value
    return value
