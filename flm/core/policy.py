"""The security policy document (SPEC §5.1): validation against the shipped JSON Schema."""

from __future__ import annotations

import ipaddress
import json
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from flm.core.errors import PolicyInvalidError

if TYPE_CHECKING:
    from jsonschema.protocols import Validator


def _is_network(value: object) -> bool:
    if not isinstance(value, str):
        return True  # the "type" keyword reports non-strings
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


@cache
def _validator() -> Validator:
    from jsonschema import Draft202012Validator, FormatChecker

    schema = json.loads(
        resources.files("flm.core").joinpath("policy.schema.json").read_text(encoding="utf-8")
    )
    checker = FormatChecker()
    checker.checks("ip-network")(_is_network)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=checker)


def _describe(path: str, message: str) -> str:
    return f"{path}: {message}"


def validate_policy(document: Any) -> dict[str, Any]:
    """Return ``document`` if it is a valid policy, else raise ``POLICY_INVALID`` naming every
    offending path (``$.ip_whitelist[0]``)."""
    if not isinstance(document, dict):
        raise PolicyInvalidError(
            f"$: the policy must be a JSON object, got {type(document).__name__}",
            details=[{"path": "$", "message": "not an object"}],
        )
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        details = [{"path": e.json_path, "message": e.message} for e in errors]
        summary = "; ".join(_describe(d["path"], d["message"]) for d in details[:5])
        raise PolicyInvalidError(f"invalid policy: {summary}", details=details)
    return document


def parse_policy_text(text: str) -> dict[str, Any]:
    """Parse and validate a policy given as JSON text."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyInvalidError(
            f"$: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            details=[{"path": "$", "message": "not valid JSON"}],
        ) from exc
    return validate_policy(document)
