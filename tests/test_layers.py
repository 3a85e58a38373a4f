"""Layers point down only: cli -> flows -> tasks -> jobs -> compaction -> kernels. A module may
import its own package and the packages below it, never one above (lazy imports inside functions
count too: every import statement in the file is read)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["cli", "flows", "tasks", "jobs", "compaction", "kernels"]  # top to bottom


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for rank, layer in enumerate(LAYERS):
        above = set(LAYERS[:rank])
        for path in sorted((REPO / layer).rglob("*.py")):
            for package in sorted(imported_packages(path) & above):
                upward.append(f"{path.relative_to(REPO)} imports {package}")
    assert upward == [], "imports that point up a layer:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from flows.post_train import post_train\n")
    assert imported_packages(bad) == {"flows"}
