"""JSON Lines logging to stderr (and files the daemon chooses), with secrets scrubbed."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, TextIO

# Anything shaped like an FLM key, a bearer token or an Argon2 hash is replaced before output.
_SECRETS = re.compile(
    r"flm_[0-9a-f]{16}_[A-Za-z0-9_-]+|(?i:bearer)\s+[A-Za-z0-9._~+/=-]+|\$argon2id?\$[^\s\"']+"
)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def scrub(text: str) -> str:
    return _SECRETS.sub("[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = scrub(value) if isinstance(value, str) else value
        if record.exc_info and os.environ.get("FLM_DEBUG"):
            body["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(body, default=str, ensure_ascii=False)


LEVELS = ("debug", "info", "warning", "error", "critical")
#: The level chosen at start (argument, else FLM_LOG_LEVEL, else WARNING): what a reload falls
#: back to when no level is configured.
_start_level = "WARNING"


def start_level() -> str:
    return _start_level


def set_level(level: str) -> str:
    """Change the ``flm`` loggers' level now (a running daemon, on reload); returns it."""
    name = level.strip().upper()
    if name.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    logging.getLogger("flm").setLevel(name)
    return name


def setup_logging(level: str | None = None, stream: TextIO | None = None) -> None:
    """Route the ``flm`` loggers to ``stream`` (stderr) as JSON Lines."""
    global _start_level
    root = logging.getLogger("flm")
    if getattr(root, "_flm_configured", False):
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    chosen = (level or os.environ.get("FLM_LOG_LEVEL") or "WARNING").upper()
    if chosen.lower() not in LEVELS:
        chosen = "WARNING"
    _start_level = chosen
    root.setLevel(chosen)
    root.propagate = False
    root._flm_configured = True  # type: ignore[attr-defined]
