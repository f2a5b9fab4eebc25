"""Plain data shared by every layer: engines, statuses, capabilities, models."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from flm.core.memo import remember


class EngineKind(str):
    """The name of an engine kind (``"ollama"``). Kinds are open: each is described once in
    :mod:`flm.engines.kinds`, which is where a name is checked; the built-in ones have
    constants here."""

    __slots__ = ()

    OLLAMA: ClassVar[EngineKind]
    VLLM: ClassVar[EngineKind]
    LMSTUDIO: ClassVar[EngineKind]
    LLAMACPP: ClassVar[EngineKind]

    @property
    def value(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"EngineKind({str(self)!r})"


EngineKind.OLLAMA = EngineKind("ollama")
EngineKind.VLLM = EngineKind("vllm")
EngineKind.LMSTUDIO = EngineKind("lmstudio")
EngineKind.LLAMACPP = EngineKind("llamacpp")


class EngineStatus(StrEnum):
    INSTALLED_ONLY = "InstalledOnly"
    RUNNING_HEALTHY = "RunningHealthy"
    RUNNING_DEGRADED = "RunningDegraded"
    ERROR_NETWORK = "ErrorNetwork"
    ERROR_API = "ErrorApi"

    @property
    def usable(self) -> bool:
        """Whether requests may be sent to an engine in this state."""
        return self in (EngineStatus.RUNNING_HEALTHY, EngineStatus.RUNNING_DEGRADED)


@dataclass(frozen=True)
class Capabilities:
    chat: bool = True
    chat_stream: bool = True
    embeddings: bool = True
    tools: bool = False
    vision_inputs: bool = False
    audio_inputs: bool = False
    audio_outputs: bool = False
    image_generation: bool = False
    #: The engine accepts ``n > 1`` (several choices per request).
    multiple_choices: bool = False
    #: The engine takes token-id arrays as input (embeddings, text-completion prompts) and
    #: several prompts in one text completion; Ollama takes text only.
    token_inputs: bool = True
    #: The engine honours ``tool_choice`` (a named function, ``required``); Ollama has no
    #: such field.
    tool_choice: bool = True
    max_image_bytes: int = 8 * 1024 * 1024
    max_audio_bytes: int = 25 * 1024 * 1024
    #: OpenAI sampling parameters the engine understands (others are dropped with a warning).
    sampling_params: frozenset[str] = frozenset(
        {
            "temperature",
            "top_p",
            "max_tokens",
            "stop",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "max_completion_tokens",
        }
    )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sampling_params"] = sorted(self.sampling_params)
        return data

    def merged(self, **changes: Any) -> Capabilities:
        data = {**asdict(self), **changes}
        return Capabilities(**data)


@dataclass(frozen=True)
class EngineEndpoint:
    """Where an engine lives: the only hosts FLM ever forwards to."""

    id: str
    kind: EngineKind
    base_url: str
    #: "default" (the kind's conventional endpoint), "registered" (flm engines add) or "managed".
    source: str = "default"
    #: Bearer key FLM presents to the engine, if it needs one (never shown or logged).
    api_key: str | None = field(default=None, repr=False, compare=False)


@dataclass
class EngineState:
    id: str
    kind: EngineKind
    base_url: str
    status: EngineStatus
    source: str = "default"
    latency_ms: float | None = None
    version: str | None = None
    binary_path: str | None = None
    error: str | None = None
    checked_at: float = 0.0
    capabilities: Capabilities = field(default_factory=Capabilities)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "base_url": self.base_url,
            "status": self.status.value,
            "source": self.source,
            "latency_ms": self.latency_ms,
            "version": self.version,
            "binary_path": self.binary_path,
            "error": self.error,
            "checked_at": self.checked_at,
            "capabilities": self.capabilities.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineState:
        caps = dict(data.get("capabilities") or {})
        if "sampling_params" in caps:
            caps["sampling_params"] = frozenset(caps["sampling_params"])
        return cls(
            id=data["id"],
            kind=EngineKind(data["kind"]),
            base_url=data["base_url"],
            status=EngineStatus(data["status"]),
            source=data.get("source", "default"),
            latency_ms=data.get("latency_ms"),
            version=data.get("version"),
            binary_path=data.get("binary_path"),
            error=data.get("error"),
            checked_at=float(data.get("checked_at") or 0.0),
            capabilities=Capabilities(**caps),
        )


@dataclass(frozen=True)
class ModelInfo:
    engine_id: str
    name: str
    context_length: int | None = None
    vision: bool = False
    embeddings_only: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    #: The engine sends prompts for this model to a service on the internet (Ollama's cloud
    #: models): hidden and refused unless the policy sets ``allow_cloud_models``.
    cloud: bool = False

    @property
    def flm_id(self) -> str:
        return make_model_id(self.engine_id, self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.flm_id,
            "engine_id": self.engine_id,
            "name": self.name,
            "context_length": self.context_length,
            "capabilities": {"vision_inputs": self.vision, "embeddings_only": self.embeddings_only},
            "details": self.details,
            "cloud": self.cloud,
        }


def is_cloud_model(name: str, *entries: Any) -> bool:
    """Whether an Ollama model runs on a remote service: its tag ends in ``cloud``
    (``gpt-oss:120b-cloud``, ``qwen3-coder:cloud``, or a bare ``-cloud`` name), or its listing
    or ``/api/show`` details name a remote host or remote model."""
    lowered = name.lower()
    if lowered.endswith(("-cloud", ":cloud")):
        return True
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        for where in (entry, entry.get("details")):
            if isinstance(where, dict) and (where.get("remote_host") or where.get("remote_model")):
                return True
    return False


MODEL_SCHEME = "flm://"
#: The longest model id accepted from a client (``flm://`` + engine id + model name).
MAX_MODEL_ID = 512
#: Engine ids, as ``flm engines add`` accepts them.
ENGINE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def make_model_id(engine_id: str, name: str) -> str:
    return f"{MODEL_SCHEME}{engine_id}/{name}"


#: Model ids already split, and ids :func:`model_id_problem` accepted (clients repeat a few).
_SPLIT: dict[str, tuple[str, str] | None] = {}
_ACCEPTED: dict[str, None] = {}
#: Only ids this short are remembered (a flood of long distinct ones is never kept).
_MEMO_ID_MAX = 256


def split_model_id(model_id: str) -> tuple[str, str] | None:
    """``flm://engine/model`` → ``(engine, model)``; ``None`` when not in that form."""
    try:
        return _SPLIT[model_id]
    except KeyError:
        pass
    parts = _split(model_id)
    if len(model_id) <= _MEMO_ID_MAX:
        remember(_SPLIT, model_id, parts)
    return parts


def _split(model_id: str) -> tuple[str, str] | None:
    if not model_id.startswith(MODEL_SCHEME):
        return None
    rest = model_id[len(MODEL_SCHEME) :]
    engine_id, sep, name = rest.partition("/")
    if not sep or not engine_id or not name:
        return None
    return engine_id, name


#: The engine part of a pool's model id (``flm://pool:NAME/model``).
POOL_PART = "pool:"


def model_id_problem(model_id: str) -> str | None:
    """Why a client's model id cannot be used, or None when it can: longer than
    :data:`MAX_MODEL_ID`, holding a character that is not printable (control and format
    characters, line separators, lone surrogates, unassigned code points), or, for an
    ``flm://`` id, an engine part that is no engine id (or ``pool:`` and a pool name). A plain
    model name or an alias passes the first two checks only. Checked before the id is used
    anywhere (routing, logs, metrics, the audit)."""
    if model_id in _ACCEPTED:
        return None
    problem = _model_id_problem(model_id)
    if problem is None and len(model_id) <= _MEMO_ID_MAX:
        remember(_ACCEPTED, model_id, None)
    return problem


def _model_id_problem(model_id: str) -> str | None:
    if len(model_id) > MAX_MODEL_ID:
        return f"model id longer than {MAX_MODEL_ID} characters"
    if not model_id.isprintable():
        return "model id holds control or unprintable characters"
    if not model_id.startswith(MODEL_SCHEME):
        if model_id[:4].lower() == "flm:":  # (a mistyped scheme is not a plain name)
            return "model must look like flm://<engine>/<model>"
        return None  # a plain name or an alias: the engine registry resolves it
    parts = split_model_id(model_id)
    if parts is None:
        return "model must look like flm://<engine>/<model>"
    engine = parts[0].removeprefix(POOL_PART)
    if ENGINE_ID.fullmatch(engine) is None:
        return "the engine part of the model id is not an engine id ([a-z0-9_-], 64 at most)"
    return None
