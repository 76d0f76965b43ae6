"""The import contract: featcircuits' packages import one way, lowest layer first, with no cycles.

Every ``import`` in the package counts, those inside functions and under ``TYPE_CHECKING`` too: a lazy
import is still a dependency, and a cycle of lazy imports is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featcircuits"

# lowest first; a module may import its own layer's modules and any lower layer's, never a higher one
LAYERS: list[tuple[str, ...]] = [
    ("featcircuits._version", "featcircuits._paths", "featcircuits._resources", "featcircuits.nodes", "featcircuits.model_families", "featcircuits.models",
     "featcircuits.circuits.tasks"),
    ("featcircuits.data", "featcircuits.dictionaries"),  # data imports no featcircuits module
    ("featcircuits.hub", "featcircuits.patching"),
    ("featcircuits.training",),
    ("featcircuits.graph", "featcircuits.circuits"),
    ("featcircuits.groundtruth", "featcircuits.viz", "featcircuits.explain"),
    ("featcircuits.pipeline", "featcircuits.commands", "featcircuits.cli", "featcircuits"),
]

# (importer, imported): deprecated aliases kept for old code, imported only when called
ALLOWED = {
    ("featcircuits.dictionaries.base", "featcircuits.hub.loading"),  # Dictionary.from_pretrained
    # Dictionary.save / Dictionary.load: conveniences over the formats, which build Dictionary objects
    ("featcircuits.dictionaries.base", "featcircuits.dictionaries.io"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every featcircuits module ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("featcircuits")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("featcircuits"):
                found.add(target)
                # `from package import module` imports that module too
                found |= {f"{target}.{alias.name}" for alias in node.names
                          if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/") / "__init__.py").exists()}
    return found


def _layer(module: str) -> int:
    """Index of the most specific layer entry that ``module`` falls under."""
    best, best_len = None, -1
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best_len:
                best, best_len = index, len(entry)
    assert best is not None, f"{module} is in no layer of the import contract; add it to LAYERS"
    return best


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {target for target in _imports(path) if target in modules} - {name}
            for name, path in modules.items()}


def test_every_import_goes_down_the_layers():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            # a package's __init__ re-exporting its own modules is not an upward import
            if target.startswith(module + ".") or (module, target) in ALLOWED:
                continue
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering (lowest first: " + " | ".join(
        ", ".join(layer) for layer in LAYERS) + "):\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {module: {t for t in targets if (module, t) not in ALLOWED and not t.startswith(module + ".")}
             for module, targets in _graph().items()}
    # packages' __init__ modules re-export their children; edges into a package mean its __init__
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_public_api_is_small_typed_and_names_no_module():
    import featcircuits as fc

    assert len(fc.__all__) <= 24
    for name in fc.__all__:
        value = getattr(fc, name)
        assert not isinstance(value, type(fc)), f"fc.{name} is a module"
    # no function shadows a module of the same name
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(fc.__path__, "featcircuits."):
        package, _, leaf = info.name.rpartition(".")
        if leaf.startswith("_") or "pretrained" in info.name:
            continue
        attribute = getattr(importlib.import_module(package), leaf, None)
        module = importlib.import_module(info.name)
        assert attribute is None or attribute is module, f"{package}.{leaf} is {attribute!r}, shadowing its module"


def test_old_top_level_names_still_resolve_with_a_warning():
    import pytest

    import featcircuits as fc
    from featcircuits.dictionaries import load_dictionary

    with pytest.warns(DeprecationWarning, match="featcircuits.dictionaries"):
        assert fc.load_dictionary is load_dictionary
