"""The packages' layering (DESIGN.md): ``stages/`` imports none of the others; ``core/`` (config,
store API, schemas) only ``stages/``; ``pipeline/`` and ``training/`` never each other, except
the CLI, which alone knows both."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "core", "pipeline", "training")
ALLOWED = {
    "stages": {"stages"},
    "core": {"core", "stages"},
    "pipeline": {"pipeline", "core", "stages"},
    "training": {"training", "core", "stages"},
}
# The CLI: the one place that knows both pipeline/ and training/ (its commands that join a
# pipeline's stages to a trained model live beside it: search, and the serving replica).
CLI = ("pipeline/cli.py", "pipeline/search.py", "pipeline/serve.py", "pipeline/serve_model.py", "pipeline/tune.py")


def imported_packages(path: Path) -> set[str]:
    """First components of every import in the file (module-level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        allowed = ALLOWED[package] | ({"training"} if rel in CLI else set())
        extra = imported_packages(path) - allowed
        if extra:
            wrong[rel] = sorted(extra)
    assert not wrong, f"imports across the layers: {wrong}"


def test_the_check_sees_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from pipeline.store import Store\n    import training.data\n")
    assert imported_packages(bad) == {"pipeline", "training"}
