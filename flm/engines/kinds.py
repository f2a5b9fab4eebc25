"""One descriptor per engine kind: everything FLM knows about a kind, in one place.

A descriptor names the kind's adapter class, its conventional endpoint (port, and the
environment variables the engine itself reads to move it), the executables that show it is
installed, and which of its native routes the gateway's pass-through forwards. Nothing else in
FLM branches on a kind's name: detection, ``flm engines add``, the proxy and the pass-through
all read descriptors. The four built-in kinds are below; another is one file that defines an
adapter and calls :func:`register` (see ``flm/testing/kinds/tgi.py`` for a sixth kind).

The pass-through fails closed: a kind whose descriptor has no :class:`PassThrough` has no
native route reachable through the gateway, and a :class:`PassThrough` forwards only the
paths its ``allowed`` pattern matches (and its ``refused`` one does not).

Adapters are named by ``"module:Class"`` (or given as the class) and imported on first use,
so reading descriptors (CLI help, defaults) imports no adapter, and no adapter imports this
module back.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flm.core.errors import UsageError
from flm.core.models import EngineEndpoint, EngineKind

if TYPE_CHECKING:
    from flm.engines.base import EngineAdapter
    from flm.http.client import EngineClient, Timeouts

#: A kind's name: lower case, as stored in config.db and shown everywhere.
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Every path (for kinds whose whole native API is forwarded except what ``refused`` names).
EVERY_ROUTE = re.compile(r"^/")


@dataclass(frozen=True)
class PassThrough:
    """Which native routes ``/engine/{id}/{path}`` forwards to an engine of this kind: those
    ``allowed`` matches and ``refused`` (its admin routes) does not; ``read_only`` ones with
    GET only. Paths are matched lower-cased."""

    allowed: re.Pattern[str]
    refused: re.Pattern[str] | None = None
    read_only: re.Pattern[str] | None = None

    def refusal(self, path: str, method: str) -> str | None:
        """Why ``method path`` is not forwarded, or ``None`` when it is."""
        lowered = path.lower()
        if not self.allowed.match(lowered):
            return "not-allowed"
        if self.refused is not None and self.refused.match(lowered):
            return "admin"
        if self.read_only is not None and self.read_only.match(lowered) and method != "GET":
            return "read-only"
        return None


@dataclass(frozen=True)
class KindDescriptor:
    name: EngineKind
    #: How people name the engine ("LM Studio").
    label: str
    #: The adapter: ``"module:Class"``, imported on first use, or the class itself.
    adapter: str | type[EngineAdapter]
    default_port: int
    default_host: str = "127.0.0.1"
    #: The environment variable the engine reads for its address (``host``, ``host:port`` or
    #: a URL), and the one for its port alone, if any.
    host_env: str | None = None
    port_env: str | None = None
    #: Executables whose presence reports the engine installed; ``binary_env`` names a
    #: variable that may point at one directly.
    binaries: tuple[str, ...] = ()
    binary_env: str | None = None
    #: ``None``: no native route is forwarded (fails closed).
    passthrough: PassThrough | None = None
    #: How to make the engine listen on loopback only (``flm security exposure``'s fix).
    loopback_fix: str = "restart the engine listening on 127.0.0.1 only"
    #: A model listing the engine answers with GET; the exposure audit asks it without a key.
    models_path: str = "/v1/models"

    def adapter_class(self) -> type[EngineAdapter]:
        adapter = self.adapter
        if isinstance(adapter, str):
            module, _, name = adapter.partition(":")
            cls: type[EngineAdapter] = getattr(importlib.import_module(module), name)
            return cls
        return adapter

    def passthrough_refusal(self, path: str, method: str) -> str | None:
        """Why the pass-through does not forward ``method path`` ("not-allowed", "admin",
        "read-only"), or ``None`` when it does."""
        if self.passthrough is None:
            return "not-allowed"
        return self.passthrough.refusal(path, method)


_KINDS: dict[str, KindDescriptor] = {}


def register(descriptor: KindDescriptor) -> KindDescriptor:
    """Add a kind (registering the same descriptor again is a no-op)."""
    name = str(descriptor.name)
    if not _NAME.match(name):
        raise ValueError(f"engine kind names are lower-case identifiers: {name!r}")
    known = _KINDS.get(name)
    if known is not None and known != descriptor:
        raise ValueError(f"engine kind {name!r} is already registered")
    _KINDS[name] = descriptor
    return descriptor


def unregister(name: str) -> None:
    """Remove a kind (for tests that register one of their own)."""
    _KINDS.pop(name, None)


def all_kinds() -> list[KindDescriptor]:
    return list(_KINDS.values())


def names() -> list[str]:
    return list(_KINDS)


def find(name: str) -> KindDescriptor | None:
    return _KINDS.get(name)


def get(name: str) -> KindDescriptor:
    """The descriptor of kind ``name``; an unknown one is the user's error, naming the kinds."""
    descriptor = _KINDS.get(name)
    if descriptor is None:
        raise UsageError(f"unknown engine kind {name!r}; expected one of {', '.join(_KINDS)}")
    return descriptor


def parse_kind(text: str) -> EngineKind:
    return get(text).name


def help_text() -> str:
    """The kinds as a sentence, for help texts: "ollama, vllm, lmstudio or llamacpp"."""
    listed = names()
    return listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} or {listed[-1]}"


def make_adapter(
    endpoint: EngineEndpoint, timeouts: Timeouts | None = None, client: EngineClient | None = None
) -> EngineAdapter:
    """An adapter for ``endpoint``; ``client`` replaces the default direct HTTP client (the
    proxy passes one that honours the egress in force)."""
    return get(endpoint.kind).adapter_class()(endpoint, timeouts, client)


# -- the built-in kinds --------------------------------------------------------------------------

OLLAMA = register(
    KindDescriptor(
        name=EngineKind.OLLAMA,
        label="Ollama",
        adapter="flm.engines.ollama:OllamaAdapter",
        default_port=11434,
        host_env="OLLAMA_HOST",
        binaries=("ollama",),
        binary_env="OLLAMA_BIN",
        # Ollama's /api/ namespace is an allow-list (its inference and read routes; anything
        # else there, present or future, is refused).
        passthrough=PassThrough(
            EVERY_ROUTE,
            refused=re.compile(
                r"^/api/(?!(generate|chat|embed|embeddings|tags|show|ps|version)/?$)"
            ),
        ),
        loopback_fix="restart Ollama with OLLAMA_HOST=127.0.0.1 (`OLLAMA_HOST=127.0.0.1 ollama "
        'serve`, or `systemctl edit ollama` and set Environment="OLLAMA_HOST=127.0.0.1")',
        models_path="/api/tags",
    )
)
VLLM = register(
    KindDescriptor(
        name=EngineKind.VLLM,
        label="vLLM",
        adapter="flm.engines.vllm:VllmAdapter",
        default_port=8000,
        host_env="VLLM_HOST",
        port_env="VLLM_PORT",
        binaries=("vllm",),
        # vLLM's control routes are refused by the words their names are made of, which no
        # inference route uses.
        passthrough=PassThrough(
            EVERY_ROUTE,
            refused=re.compile(
                r"^/(v1/)?[a-z0-9_]*(lora|profile|cache|sleep|wake|rpc|elastic|weight|server_info"
                r"|pause|resume|abort|fault_tolerance)"
            ),
        ),
        loopback_fix="restart vLLM with --host 127.0.0.1 (`vllm serve MODEL --host 127.0.0.1`)",
    )
)
LMSTUDIO = register(
    KindDescriptor(
        name=EngineKind.LMSTUDIO,
        label="LM Studio",
        adapter="flm.engines.lmstudio:LmStudioAdapter",
        default_port=1234,
        host_env="LMSTUDIO_API_HOST",
        binaries=("lms",),
        passthrough=PassThrough(
            EVERY_ROUTE, refused=re.compile(r"^/api/v[01]/models/(load|unload|download)(/|$)")
        ),
        loopback_fix="in LM Studio's Developer tab, server settings, switch off \"Serve on Local "
        'Network" (or start it with `lms server start` without --bind 0.0.0.0)',
    )
)
LLAMACPP = register(
    KindDescriptor(
        name=EngineKind.LLAMACPP,
        label="llama.cpp",
        adapter="flm.engines.llamacpp:LlamaCppAdapter",
        default_port=8080,
        host_env="LLAMA_CPP_HOST",
        port_env="LLAMA_CPP_PORT",
        binaries=("llama-server", "llama-cpp-server"),
        binary_env="LLAMA_SERVER_PATH",
        # /props accepts POST to change server settings.
        passthrough=PassThrough(
            EVERY_ROUTE,
            refused=re.compile(r"^/(slots|lora-adapters|models/(load|unload))(/|$)"),
            read_only=re.compile(r"^/props$"),
        ),
        loopback_fix="restart llama-server with --host 127.0.0.1",
    )
)
