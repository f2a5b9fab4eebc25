"""Request ids (``{unix_ms}-{random}``, SPEC §4.3): correlation handles, not secrets — a PRNG
seeded from the OS is enough and avoids a system call per request."""

from __future__ import annotations

import random
import secrets
import time

_ids = random.Random(secrets.randbits(64))  # noqa: S311 - ids are not secrets


def new_request_id() -> str:
    return f"{int(time.time() * 1000)}-{_ids.getrandbits(48):012x}"
