"""Model profiles (default parameters per engine + model) and API prompts (templates applied
to the messages of one API) — SPEC §4.2. Stored in config.db; the proxy loads them at start
and on every reload, so applying them costs two dictionary lookups per request."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from flm.core.errors import NotFoundError, UsageError
from flm.core.timeutil import now_iso
from flm.storage import Storage
from flm.storage.profiles import ApiPromptsRepo, ModelProfilesRepo

#: Parameters a profile may set, with their accepted types and ranges.
PROFILE_PARAMS: dict[str, tuple[type | tuple[type, ...], float | None, float | None]] = {
    "temperature": ((int, float), 0, 2),
    "top_p": ((int, float), 0, 1),
    "max_tokens": (int, 1, 1_000_000),
    "seed": (int, None, None),
    "presence_penalty": ((int, float), -2, 2),
    "frequency_penalty": ((int, float), -2, 2),
    "stop": ((str, list), None, None),
}
#: The APIs a prompt template can be attached to.
PROMPT_APIS = ("chat_completions", "responses")
USER_MESSAGE = "{{user_message}}"
_LABEL = re.compile(r"^[\w .:/@+-]{1,100}$")


def check_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict) or not params:
        raise UsageError("profile parameters must be a non-empty JSON object")
    for key, value in params.items():
        if key not in PROFILE_PARAMS:
            raise UsageError(
                f"unknown profile parameter {key!r} (known: {', '.join(sorted(PROFILE_PARAMS))})"
            )
        kinds, low, high = PROFILE_PARAMS[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise UsageError(f"profile parameter {key!r} has the wrong type")
        if isinstance(value, (int, float)) and (
            math.isnan(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise UsageError(f"profile parameter {key!r} must be between {low} and {high}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise UsageError("'stop' must be a string or a list of strings")
    return params


def apply_profile(body: dict[str, Any], params: dict[str, Any] | None) -> bool:
    """Fill what the request did not set; whether anything was added."""
    if not params:
        return False
    changed = False
    for key, value in params.items():
        if key not in body:
            body[key] = value
            changed = True
    return changed


def apply_prompt(messages: list[Any], template: str | None) -> list[Any] | None:
    """The messages with the template applied, or ``None`` when there is nothing to do.

    A template containing ``{{user_message}}`` rewrites the last user message whose content is
    text; any other template is put in front as a system message."""
    if not template:
        return None
    if USER_MESSAGE not in template:
        return [{"role": "system", "content": template}, *messages]
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if (
            isinstance(message, dict)
            and message.get("role") == "user"
            and isinstance(message.get("content"), str)
        ):
            rendered = template.replace(USER_MESSAGE, message["content"])
            return [*messages[:index], {**message, "content": rendered}, *messages[index + 1 :]]
    return None


class ProfileService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    # --- model profiles ----------------------------------------------------------------------

    def profiles(
        self, engine_id: str | None = None, model_id: str | None = None
    ) -> list[dict[str, Any]]:
        out = []
        for item in ModelProfilesRepo(self._storage.config).all(engine_id, model_id):
            item["parameters"] = json.loads(item.pop("parameters_json"))
            out.append(item)
        return out

    def save_profile(
        self, engine_id: str, model_id: str, label: str, params: Any
    ) -> dict[str, Any]:
        if not engine_id or not model_id:
            raise UsageError("--engine and --model are required")
        if not _LABEL.match(label):
            raise UsageError("a profile label must be 1-100 plain characters")
        checked = check_params(params)
        stamp = now_iso()
        text = json.dumps(checked, sort_keys=True)
        profile_id, version = ModelProfilesRepo(self._storage.config).save(
            engine_id, model_id, label, text, stamp
        )
        return {
            "id": profile_id,
            "engine_id": engine_id,
            "model_id": model_id,
            "label": label,
            "parameters": checked,
            "version": version,
            "updated_at": stamp,
        }

    def delete_profile(self, profile_id: str) -> dict[str, Any]:
        if not ModelProfilesRepo(self._storage.config).delete(profile_id):
            raise NotFoundError(
                f"no model profile with id {profile_id!r}", code="PROFILE_NOT_FOUND"
            )
        return {"id": profile_id, "deleted": True}

    def effective_profiles(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(engine, model) → parameters of its most recently saved profile."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for item in self.profiles():  # ordered by updated_at: the latest wins
            out[(item["engine_id"], item["model_id"])] = item["parameters"]
        return out

    # --- API prompts -------------------------------------------------------------------------

    @staticmethod
    def _check_api(api_id: str) -> str:
        if api_id not in PROMPT_APIS:
            raise UsageError(f"--api-id must be one of {', '.join(PROMPT_APIS)}")
        return api_id

    def prompts(self) -> list[dict[str, Any]]:
        return ApiPromptsRepo(self._storage.config).all()

    def prompt(self, api_id: str) -> dict[str, Any]:
        row = ApiPromptsRepo(self._storage.config).get(self._check_api(api_id))
        if row is None:
            raise NotFoundError(f"no prompt set for {api_id}", code="PROMPT_NOT_FOUND")
        return row

    def set_prompt(self, api_id: str, template: str) -> dict[str, Any]:
        self._check_api(api_id)
        template = template.rstrip("\n")  # a file's final newline is not part of the prompt
        if not template.strip() or len(template) > 64 * 1024:
            raise UsageError("a prompt template must be 1 byte to 64 KB of text")
        stamp = now_iso()
        version = ApiPromptsRepo(self._storage.config).put(api_id, template, stamp)
        return {
            "api_id": api_id,
            "template_text": template,
            "version": version,
            "updated_at": stamp,
        }

    def delete_prompt(self, api_id: str) -> dict[str, Any]:
        self._check_api(api_id)
        if not ApiPromptsRepo(self._storage.config).delete(api_id):
            raise NotFoundError(f"no prompt set for {api_id}", code="PROMPT_NOT_FOUND")
        return {"api_id": api_id, "deleted": True}

    def effective_prompts(self) -> dict[str, str]:
        return {p["api_id"]: p["template_text"] for p in self.prompts()}
