"""The library's packages form layers: each imports only itself and the packages below it.

common (params, records, logs, timings) < llm (the one client, local servers) < data (crawl, augment,
clean, rules, Alpaca records, review decisions) < model (loading, templates, tokenization, training,
export) < eval (scoring, metrics, intervals, judge) < interface (cli, report, review app). Stage
scripts in stages/ sit above all of them.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["common", "llm", "data", "model", "eval", "interface"]


def tuneline_imports(path: Path) -> list[tuple[int, str]]:
    """(line, package) for every import of a tuneline package in the file, lazy imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "tuneline" else [f"tuneline.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, name.split(".")[1]) for name in names if name.startswith("tuneline.")]
    return found


def upward_imports(root: Path) -> list[str]:
    arrows = []
    for path in sorted((root / "tuneline").rglob("*.py")):
        parts = path.relative_to(root / "tuneline").parts
        if parts == ("__init__.py",):
            continue
        if len(parts) == 1:
            arrows.append(f"tuneline/{parts[0]} is outside the packages")
            continue
        own = LAYERS.index(parts[0])
        for line, package in tuneline_imports(path):
            if package not in LAYERS or LAYERS.index(package) > own:
                arrows.append(
                    f"{path.relative_to(root)}:{line} imports tuneline.{package} ({parts[0]} is below it)"
                )
    return arrows


def test_every_module_lives_in_a_package_and_no_import_runs_back_up():
    assert sorted(
        p.name for p in (ROOT / "tuneline").iterdir() if p.is_dir() and p.name != "__pycache__"
    ) == sorted(LAYERS)
    assert upward_imports(ROOT) == []


def test_an_upward_import_is_found(tmp_path):
    (tmp_path / "tuneline" / "common").mkdir(parents=True)
    (tmp_path / "tuneline" / "eval").mkdir()
    (tmp_path / "tuneline" / "common" / "records.py").write_text(
        "def f():\n    from tuneline.eval import intervals\n"
    )
    (tmp_path / "tuneline" / "eval" / "intervals.py").write_text("from tuneline.common import records\n")
    assert upward_imports(tmp_path) == [
        "tuneline/common/records.py:2 imports tuneline.eval (common is below it)"
    ]
