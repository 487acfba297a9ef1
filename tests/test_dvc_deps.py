"""dvc.yaml lists, for every stage, exactly the Python modules its script imports.

A module a stage imports but does not list means an edit there does not rerun the stage (stale
outputs); one it lists but does not import means needless reruns. The closure is computed with
`ast` from the stage's `cmd` (`python -m stages.<name>`), following every import inside
`stages/` and `tuneline/` (including imports inside functions), and includes the `stages`
package's `__init__.py`, which `python -m stages.<name>` runs first. Empty `__init__.py` files
hold no code and are left out. A module a stage starts as a process (`"-m", "tuneline.llm.structserve"`:
the local LLM server that writes augment's replies) counts as imported: its code makes the outputs too.
The test reads dvc.yaml, so it covers every stage there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "tuneline")


def module_file(name: str) -> Path | None:
    """The file of a dotted module inside the project packages, or None (third-party, stdlib)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """Project files that `path` imports directly, with the packages on the way."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from tuneline import crawl` imports the module tuneline.data.crawl, if there is one
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.List) and any(
            isinstance(e, ast.Constant) and e.value == "-m" for e in node.elts
        ):
            # a command line that runs a project module: ["python", "-m", "tuneline.x", ...]
            names = [
                e.value
                for e in node.elts
                if isinstance(e, ast.Constant)
                and isinstance(e.value, str)
                and re.fullmatch(r"(tuneline|stages)(\.\w+)+", e.value)
            ]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                f = module_file(".".join(parts[:i]))
                if f is not None:
                    found.add(f)
    return found


def closure(script: Path) -> set[str]:
    todo = [script, ROOT / "stages" / "__init__.py"]
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(imported_files(f))
    return {str(f.relative_to(ROOT)) for f in seen if f.name != "__init__.py" or f.read_text().strip()}


def stages() -> dict[str, dict]:
    data = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: stage.get("do", stage) for name, stage in data.items()}


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_are_exactly_its_import_closure(name):
    stage = stages()[name]
    match = re.match(r"python -m (stages\.\w+)", stage["cmd"])
    assert match, f"{name}: cmd {stage['cmd']!r} does not run a stage script"
    script = module_file(match.group(1))
    assert script is not None, f"{name}: {match.group(1)} has no file"
    listed = {
        d
        for d in stage.get("deps", [])
        if isinstance(d, str) and d.endswith(".py") and d.startswith(PACKAGES)
    }
    wanted = closure(script)
    assert not wanted - listed, f"dvc.yaml stage {name!r} misses deps it imports: {sorted(wanted - listed)}"
    assert not listed - wanted, (
        f"dvc.yaml stage {name!r} lists deps it does not import: {sorted(listed - wanted)}"
    )
