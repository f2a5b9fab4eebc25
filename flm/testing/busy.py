"""A busy ``security.db`` for the web UI's scale test and bench: many API keys and audit rows
spread over a week (a share of them in the last hour), and the usage rollups those requests
would have left, written through the storage repositories in a few transactions."""

from __future__ import annotations

import random
from datetime import timedelta

from flm.core.timeutil import iso, utc_now
from flm.storage import Storage
from flm.storage.records import AUDIT_COLUMNS, write_batch
from flm.storage.security import ApiKeysRepo, KeyLimits
from flm.storage.usage import add_rollups

#: statuses drawn for the requests: mostly served, some 401 / 429 / 403 refusals
STATUSES = [200] * 17 + [401, 429, 403]


def key_id(i: int) -> str:
    return f"{i:08x}"


def fill(
    storage: Storage, rows: int, keys: int, *, recent: int | None = None, seed: int = 7
) -> None:
    """``keys`` keys (the first ten scoped and limited) and ``rows`` audit rows: ``recent``
    of them (default 6%) in the last hour, the rest over the week before; request ``i`` comes
    from key ``i % keys`` through engine ``emu`` (every tenth through ``emu-b``)."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    now = utc_now()
    recent = int(rows * 0.06) if recent is None else recent
    ApiKeysRepo(storage.security).insert_many(
        [
            (
                key_id(i),
                f"key {i}",
                f"not-a-hash-{i}",
                KeyLimits(models=["flm://emu/*"], rpm=60, daily_tokens=100_000)
                if i < 10
                else KeyLimits(),
            )
            for i in range(keys)
        ]
    )
    audit = []
    minutes: dict[tuple[int, str, str, str], list[int]] = {}
    hours: dict[tuple[int, str, str, str], list[int]] = {}
    empty = dict.fromkeys(AUDIT_COLUMNS)
    for i in range(rows):
        seconds = rng.uniform(0, 3500) if i < recent else rng.uniform(3700, 7 * 86400)
        stamp = now - timedelta(seconds=seconds)
        engine = "emu-b" if i % 10 == 9 else "emu"
        status = rng.choice(STATUSES)
        prompt, completion = rng.randint(5, 60), rng.randint(5, 200)
        row = {
            **empty,
            "ts": iso(stamp),
            "request_id": f"r{i}",
            "client_ip": "192.0.2.1",
            "api_key_id": key_id(i % keys),
            "endpoint": "/v1/chat/completions",
            "method": "POST",
            "engine_id": engine,
            "model": "m",
            "status": status,
            "latency_ms": rng.uniform(5, 500),
            "event_type": "request",
            "severity": "info",
        }
        audit.append(tuple(row[c] for c in AUDIT_COLUMNS))
        if status == 200 and seconds < 48 * 3600:
            unix = stamp.timestamp()
            for table, unit in ((minutes, 60), (hours, 3600)):
                sums = table.setdefault((int(unix // unit), key_id(i % keys), "m", engine), [0] * 4)
                sums[0] += 1
                sums[1] += prompt
                sums[2] += completion
    write_batch(storage.security, audit, [], [], [])
    add_rollups(storage.security, minutes, hours, {})
