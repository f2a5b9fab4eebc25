"""The UI's words: ``locales/en.json`` and ``locales/ja.json``, one key per visible string.

A missing key falls back ja -> en -> the key name itself (so a gap shows, never crashes).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

LANGUAGES = ("en", "ja")


@cache
def catalog(lang: str) -> dict[str, str]:
    text = resources.files("flm.ui").joinpath("locales", f"{lang}.json").read_text("utf-8")
    data: dict[str, str] = json.loads(text)
    return data


def translate(lang: str, key: str, **values: Any) -> str:
    text = catalog(lang).get(key) if lang in LANGUAGES else None
    if text is None:
        text = catalog("en").get(key, key)
    if values:
        try:
            return text.format(**values)
        except (KeyError, IndexError, ValueError):
            return text
    return text


def from_accept_language(header: str | None) -> str:
    """The first of our languages the browser prefers (by q-value), else English."""
    best, best_q = "en", -1.0
    for position, part in enumerate((header or "").split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        base = tag.strip().lower().split("-")[0]
        score = q - position * 1e-6
        if base in LANGUAGES and score > best_q:
            best, best_q = base, score
    return best
