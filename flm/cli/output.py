"""Rendering results: JSON ``{"version": "1.0", "data": …}`` by default, tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from flm.core.errors import FlmError

ENVELOPE_VERSION = "1.0"
T = TypeVar("T")


@dataclass
class Result:
    """What a command returns: data for JSON, and optionally how to show it to a person."""

    data: Any
    text: Callable[[Any], str] | None = None
    exit_code: int = 0
    #: Extra lines for people (text mode only), e.g. "store this key now".
    notes: list[str] = field(default_factory=list)
    #: Text written to stdout as is, in either format (e.g. a shell completion script).
    raw: str | None = None
    #: ``--format csv``: the rows and columns to write (default: the data, if it is a list
    #: of objects).
    csv: Callable[[Any], tuple[list[dict[str, Any]], list[str]]] | None = None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


#: Tables are cut to fit this many columns (a common terminal; long cells end in "…").
TABLE_WIDTH = 100


def table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, width: int = TABLE_WIDTH
) -> str:
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)).replace("\n", " ") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    budget = width - 2 * (len(cols) - 1)
    floors = [min(w, max(len(c), 6)) for c, w in zip(cols, widths, strict=True)]
    while sum(widths) > budget:  # narrow the widest column that may still give
        room = [i for i, w in enumerate(widths) if w > floors[i]]
        if not room:
            break
        widest = max(room, key=lambda i: widths[i])
        others = max((w for i, w in enumerate(widths) if i != widest), default=0)
        excess = sum(widths) - budget
        widths[widest] -= max(1, min(widths[widest] - max(others, floors[widest]), excess))
    cells = [
        [v if len(v) <= w else v[: w - 1] + "…" for v, w in zip(row, widths, strict=True)]
        for row in cells
    ]
    head = "  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))
    lines = [head, "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def pairs(data: dict[str, Any]) -> str:
    width = max((len(k) for k in data), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in data.items())


def emit(result: Result, fmt: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if result.raw is not None:
        out.write(result.raw)
    elif fmt == "csv" and (
        result.csv is not None
        or (isinstance(result.data, list) and all(isinstance(r, dict) for r in result.data))
    ):
        _emit_csv(result, out)
    elif fmt == "text":
        body = result.text(result.data) if result.text else _default_text(result.data)
        out.write(body.rstrip("\n") + "\n")
        for note in result.notes:
            out.write(note + "\n")
    else:
        out.write(
            json.dumps(
                {"version": ENVELOPE_VERSION, "data": result.data}, ensure_ascii=False, default=str
            )
            + "\n"
        )
    out.flush()


def _emit_csv(result: Result, out: TextIO) -> None:
    import csv

    if result.csv is not None:
        rows, columns = result.csv(result.data)
    else:
        rows = result.data
        columns = list(rows[0].keys()) if rows else []
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    out.flush()


def _default_text(data: Any) -> str:
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return table(data)
    if isinstance(data, dict):
        return pairs(data)
    return _cell(data)


def emit_error(error: FlmError, fmt: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if fmt == "text":
        out.write(f"error [{error.code}]: {error.message}\n")
        details = error.details
        if isinstance(details, list):
            for item in details:
                out.write(f"  - {_cell(item)}\n")
    else:
        out.write(json.dumps({"error": error.to_dict()}, ensure_ascii=False, default=str) + "\n")
    out.flush()


class Progress:
    """A spinner on stderr, only when stderr is a terminal (silent in pipes, tests and CI)."""

    FRAMES = "|/-\\"

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._n = 0

    def update(self, message: str) -> None:
        if not self.enabled:
            return
        frame = self.FRAMES[self._n % len(self.FRAMES)]
        self._n += 1
        sys.stderr.write(f"\r{frame} {message}\033[K")
        sys.stderr.flush()

    def done(self, message: str | None = None) -> None:
        if not self.enabled:
            return
        sys.stderr.write("\r\033[K" + (message + "\n" if message else ""))
        sys.stderr.flush()


def run_async(coro: Coroutine[Any, Any, T], message: str) -> T:
    """Run ``coro`` to completion, with a spinner on a terminal while it works."""
    import asyncio

    progress = Progress()
    if not progress.enabled:
        return asyncio.run(coro)

    async def with_spinner() -> T:
        task = asyncio.ensure_future(coro)
        while not task.done():
            progress.update(message)
            await asyncio.wait([task], timeout=0.1)
        progress.done()
        return task.result()

    return asyncio.run(with_spinner())
