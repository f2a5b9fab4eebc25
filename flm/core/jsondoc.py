"""JSON documents a user hands to FLM (a policy, model parameters): strict parsing with one
kind of error for everything that is not a plain JSON document."""

from __future__ import annotations

import json
from typing import Any


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def parse_document(text: str) -> Any:
    """``text`` as JSON, refusing what Python's parser would let through or choke on:
    ``NaN``/``Infinity``, numbers that overflow, integers too long to convert, nesting deep
    enough to exhaust the stack. A leading byte-order mark is allowed. Every refusal is a
    ``ValueError`` (``json.JSONDecodeError`` for syntax errors)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("the document is nested too deeply") from None
