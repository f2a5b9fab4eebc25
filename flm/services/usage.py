"""Usage reports from the rollups the proxies write (``usage_minute``, ``usage_hour``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from flm.core.errors import UsageError
from flm.core.keyscope import parse_expiry
from flm.core.timeutil import parse_iso
from flm.storage import Storage
from flm.storage.usage import usage_rows

GROUPS = ("key", "model", "engine", "hour")


def parse_since(text: str | None, now: float | None = None) -> float:
    """``24h``, ``7d``, ``90m``, ``2w`` ago, or a date / ISO datetime; default 24 hours."""
    now = time.time() if now is None else now
    if not text:
        return now - 86_400
    text = text.strip()
    if text[-1:] in "mhdw" and text[:-1].isdigit():
        # (a duration back from now: the same syntax as --expires, the other way)
        ahead = parse_iso(parse_expiry(text, datetime.fromtimestamp(now, UTC))).timestamp()
        return now - (ahead - now)
    try:
        return parse_iso(text).timestamp()
    except ValueError:
        raise UsageError(
            f"--since takes a duration (24h, 7d) or a date; not {text[:60]!r}"
        ) from None


class UsageService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def report(
        self,
        *,
        key: str | None = None,
        model: str | None = None,
        since: str | None = None,
        by: str = "key",
    ) -> dict[str, Any]:
        if by not in GROUPS:
            raise UsageError(f"--by takes one of {', '.join(GROUPS)}")
        now = time.time()
        start = parse_since(since, now)
        rows = usage_rows(self._storage.security, start, now, by, key=key, model=model)
        out = []
        for r in rows:
            item: dict[str, Any] = {}
            if by == "hour":
                item["hour"] = datetime.fromtimestamp(int(r["grp"]) * 3600, UTC).strftime(
                    "%Y-%m-%dT%H:00Z"
                )
            else:
                item[by] = r["grp"]
                if by == "key":
                    item["label"] = r["label"]
            prompt, completion = int(r["prompt_tokens"]), int(r["completion_tokens"])
            item.update(
                requests=int(r["requests"]),
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                estimated_requests=int(r["estimated"]),
            )
            out.append(item)
        return {
            "since": datetime.fromtimestamp(start, UTC)
            .isoformat(timespec="seconds")
            .replace("+00:00", "Z"),
            "by": by,
            "rows": out,
        }
