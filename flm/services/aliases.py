"""Model aliases (``flm models alias …``): names of the user's choosing for ``flm://`` ids.

Stored in config.db; running proxies load them at start and on every reload into one dict, so
resolving an alias costs one lookup per request."""

from __future__ import annotations

import re
from typing import Any

from flm.core.errors import NotFoundError, UsageError
from flm.core.models import MODEL_SCHEME, split_model_id
from flm.core.timeutil import now_iso
from flm.storage import Storage
from flm.storage.config_db import ModelAliasesRepo

#: What an alias may look like: what OpenAI clients send as a model name (``gpt-4o-mini``,
#: ``text-embedding-3-small``, ``llama3.2:1b``, ``org/model``), never an ``flm://`` id.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,199}$")


def check_alias_name(name: str) -> str:
    if name.startswith(MODEL_SCHEME) or not _NAME.match(name):
        raise UsageError(
            f"alias {name[:100]!r}: use 1-200 letters, digits and ._:@/+- "
            "(starting with a letter or digit), not an flm:// id"
        )
    return name


def check_target(target: str) -> str:
    if split_model_id(target) is None:
        raise UsageError(
            f"alias target must look like flm://<engine>/<model>, got {target[:200]!r}"
        )
    return target


class AliasService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def list(self) -> list[dict[str, Any]]:
        return ModelAliasesRepo(self._storage.config).all()

    def effective(self) -> dict[str, str]:
        """alias → ``flm://`` id, as the proxy applies them."""
        return {r["name"]: r["target"] for r in self.list()}

    def set(self, name: str, target: str) -> dict[str, Any]:
        check_alias_name(name)
        check_target(target)
        stamp = now_iso()
        ModelAliasesRepo(self._storage.config).put(name, target, stamp)
        return {"name": name, "target": target, "updated_at": stamp}

    def remove(self, name: str) -> dict[str, Any]:
        if not ModelAliasesRepo(self._storage.config).remove(name):
            raise NotFoundError(f"no model alias {name[:100]!r}", code="ALIAS_NOT_FOUND")
        return {"name": name, "removed": True}
