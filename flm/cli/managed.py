"""``flm engines start/stop/install``: the managed llama.cpp engine (implemented next)."""

from __future__ import annotations

import argparse
from typing import Any


def register(cmds: Any, common: argparse.ArgumentParser) -> None:
    return None
