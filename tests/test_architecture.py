"""The import floors of docs/architecture.md hold: every `llmkit` module imports only from its own
package or from lower floors, at module level and inside functions alike (read from the source, so a
lazy upward import is caught too). The floors are parsed from the document, so the two cannot drift."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "llmkit"


def floors() -> dict[str, int]:
    """{unit: floor} from the arrow line of docs/architecture.md (`a` → `b, c` → ...)."""
    text = (ROOT / "docs/architecture.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("`errors`"))
    return {unit.strip(" `"): i for i, group in enumerate(line.split("→")) for unit in group.split(",")}


def unit_of(module: str) -> str:
    """`llmkit.train.loop` -> `train`, `llmkit.rope` -> `rope`, `llmkit` -> `llmkit` (the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "llmkit"


def imports(path: Path):
    """(line, imported llmkit module) for every import in the file; `from llmkit import x` imports llmkit.x."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "llmkit")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "llmkit":
                yield from ((node.lineno, f"llmkit.{a.name}") for a in node.names)
            elif node.module.startswith("llmkit."):
                yield node.lineno, node.module


def test_every_unit_has_a_floor():
    known = floors()
    units = {p.stem if p.parent == PACKAGE else p.parent.relative_to(PACKAGE).parts[0]
             for p in PACKAGE.rglob("*.py")}
    units = {"llmkit" if u == "__init__" else u for u in units}
    assert units - set(known) == set(), "give these a floor in docs/architecture.md"


def test_imports_only_go_down():
    floor = floors()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        me = unit_of(".".join(p for p in rel.parts if p != "__init__"))
        for line, module in imports(path):
            other = unit_of(module)
            if other not in floor:  # `from llmkit import Transformer`: a name the package root re-exports
                other = "llmkit"
            if other != me and floor.get(other, 99) >= floor[me]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({me}, floor {floor[me]}) imports {module} "
                             f"({other}, floor {floor.get(other)})")
    assert wrong == [], "\n".join(wrong)


def test_the_checker_sees_an_upward_import_inside_a_function(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from llmkit.serve.app import serve\n    import llmkit.cli\n")
    assert [m for _, m in imports(source)] == ["llmkit.serve.app", "llmkit.cli"]
    assert re.search(r"`errors`", (ROOT / "docs/architecture.md").read_text())
