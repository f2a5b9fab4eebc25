"""The security policy: show and replace, always validated, the old one kept on refusal."""

from __future__ import annotations

import json
from typing import Any

from flm.core.policy import parse_policy_text, validate_policy
from flm.storage import Storage
from flm.storage.security import PolicyRepo


class PolicyService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    @property
    def _repo(self) -> PolicyRepo:
        return PolicyRepo(self._storage.security)

    def show(self) -> dict[str, Any]:
        stored = self._repo.get()
        if stored is None:
            return {"id": "default", "policy": {}, "updated_at": None, "source": "default"}
        text, updated_at = stored
        return {
            "id": "default",
            "policy": json.loads(text),
            "updated_at": updated_at,
            "source": "stored",
        }

    def set_text(self, text: str) -> dict[str, Any]:
        return self.set(parse_policy_text(text))

    def set(self, document: Any) -> dict[str, Any]:
        policy = validate_policy(document)
        updated_at = self._repo.put(json.dumps(policy, sort_keys=True, separators=(",", ":")))
        return {"id": "default", "policy": policy, "updated_at": updated_at, "source": "stored"}
