"""The package's layers import one way: a module imports only from its own package or a lower layer.

Every import statement counts, those inside functions too (the AST is walked, not only the module's
top level): an import deferred into a function is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Lowest first. Entries of one layer are peers: neither imports the other (training and sampling
# share what they need through the layers below them).
LAYERS: list[tuple[str, ...]] = [
    ("pipeline.ddpm",),  # the maths and the model: torch only
    ("pipeline.errors", "pipeline.config", "pipeline.scratch", "pipeline.grid"),
    ("pipeline.checkpoint", "pipeline.data"),  # the checkpoint format; shards and storage
    ("pipeline.tracking", "pipeline.cluster"),  # the doors to MLflow (runs, metrics) and to Ray
    ("pipeline.train", "pipeline.sample"),
    ("pipeline.registry",),  # registered models: versions, aliases, promotion
    ("pipeline.sweep",),
    ("pipeline.cli",),  # the jobs' preamble
]


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer, entry) of a module of the package; None for the package itself."""
    for level, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                return level, entry
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the package's own modules in ``path``, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pipeline.sample import model` imports the module pipeline.sample.model
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return [(line, m) for line, m in out if m == "pipeline" or m.startswith("pipeline.")]


def upward_imports() -> list[str]:
    bad = []
    for path in sorted((REPO_ROOT / "pipeline").rglob("*.py")):
        here = unit_of(module_name(path))
        if here is None:
            continue
        for line, target in imported(path):
            there = unit_of(target)
            if there is None or there[1] == here[1]:
                continue
            if there[0] >= here[0]:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{line} ({here[1]}) imports {target} ({there[1]})")
    return bad


def test_every_module_of_the_package_has_a_layer():
    missing = [
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "pipeline").rglob("*.py")
        if unit_of(module_name(p)) is None and module_name(p) != "pipeline"
    ]
    assert not missing, f"modules with no layer in LAYERS: {missing}"


def test_no_import_goes_up_or_across_a_layer():
    bad = upward_imports()
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A deferred import of a higher layer is caught as one at module level would be."""
    import tests.unit.test_layers as layers

    fake = tmp_path / "pipeline" / "ddpm"
    fake.mkdir(parents=True)
    (fake / "leaky.py").write_text("def f():\n    from pipeline.sample.evaluate import evaluate\n    return evaluate\n")
    monkeypatch.setattr(layers, "REPO_ROOT", tmp_path)
    assert layers.upward_imports() == [
        "pipeline/ddpm/leaky.py:2 (pipeline.ddpm) imports pipeline.sample.evaluate.evaluate (pipeline.sample)"
    ]
