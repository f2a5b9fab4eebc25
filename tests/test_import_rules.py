"""The layers of ``docs/architecture.md``, held over every import in ``flm/`` (module level and
inside functions): a package imports only packages of a lower layer (or itself)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import flm

ROOT = Path(flm.__file__).parent

#: Top to bottom as in docs/architecture.md; a package may import only lower layers.
LAYERS: dict[str, int] = {
    "__main__": 7,
    "cli": 6,
    "daemon": 6,
    "testing": 6,
    "proxy": 5,
    "ui": 5,
    "services": 4,
    "engines": 3,
    "egress": 2,
    "openai": 2,
    "storage": 2,
    "state": 2,
    "tls": 2,
    "http": 1,
    "core": 0,
}

#: Said outright, whatever the layers above say.
FORBIDDEN: dict[str, set[str]] = {
    "http": {"openai", "proxy", "services", "cli", "daemon", "engines", "storage", "egress"},
    "core": set(LAYERS) - {"core"},
}


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, flm subpackage) of every import of FLM code in ``path``."""
    module = ".".join(("flm", *path.relative_to(root).with_suffix("").parts))
    if path.name == "__init__.py":
        module = module.rsplit(".", 1)[0] + ".__init__"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = module.split(".")[: -node.level]
                names = [".".join([*base, *([node.module] if node.module else [])])]
            elif node.module:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "flm" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        source = path.relative_to(root).with_suffix("").parts[0]
        for line, target in _imports(path, root):
            if target == source:
                continue
            where = f"{path.relative_to(root.parent)}:{line} imports flm.{target}"
            if target in FORBIDDEN.get(source, set()):
                bad.append(f"{where} (forbidden for flm.{source})")
            elif target not in LAYERS or source not in LAYERS:
                bad.append(f"{where} (a package missing from LAYERS)")
            elif LAYERS[target] >= LAYERS[source]:
                bad.append(f"{where} (not a lower layer than flm.{source})")
    return bad


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), packages - set(LAYERS)


def test_nothing_imports_upward_or_across_a_forbidden_line() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("package", "line", "refused"),
    [
        ("http", "from flm.openai.errors import error_bytes", True),
        ("http", "import flm.proxy.app", True),
        ("http", "from flm.services import engines", True),
        ("http", "from flm.cli import main", True),
        ("core", "from flm.http import server", True),
        ("storage", "from flm.services.api_keys import KeyService", True),
        ("engines", "from flm.proxy import asgi", True),
        ("engines", "from ..proxy import asgi", True),  # relative imports count too
        ("services", "def f():\n    from flm.daemon import main", True),  # and function-level
        ("http", "from flm.core.errors import EngineError", False),
        ("engines", "from flm.http.client import EngineClient", False),
        ("proxy", "from flm.services.context import Context", False),
        ("core", "import json", False),
    ],
)
def test_the_check_finds_what_it_must(
    tmp_path: Path, package: str, line: str, refused: bool
) -> None:
    root = tmp_path / "flm"
    (root / package).mkdir(parents=True)
    (root / package / "mod.py").write_text(line + "\n")
    assert bool(violations(root)) is refused
