"""One error channel: the library raises typed errors (params.ParamsError, records.InputError,
records.EndpointError), and only a stage's entry hook (stages/__init__) and the CLI's `main` turn
them into a message and an exit status. No module under tuneline/ ends the process itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tuneline.common.params import ParamsError
from tuneline.common.records import EndpointError, InputError, exit_code

ROOT = Path(__file__).resolve().parents[1]


def is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__": sys.exit(main())`, the one way a module run with -m returns main's
    status."""
    return (
        isinstance(node, ast.If)
        and ast.unparse(node.test) == "__name__ == '__main__'"
        and [ast.unparse(n) for n in node.body] == ["sys.exit(main())"]
    )


def exits_in(tree: ast.Module) -> list[str]:
    """Every `SystemExit`, `sys.exit` or `exit()` in `tree` outside a main guard, as `line: source`."""
    guards = {id(n) for top in tree.body if is_main_guard(top) for n in ast.walk(top)}
    found = []
    for node in ast.walk(tree):
        if id(node) in guards:
            continue
        named = (
            isinstance(node, ast.Name)
            and node.id in ("SystemExit", "exit", "quit")
            or isinstance(node, ast.Attribute)
            and node.attr == "exit"
            and ast.unparse(node.value) == "sys"
        )
        if named:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_under_tuneline_exits_the_process():
    found = {}
    for path in sorted((ROOT / "tuneline").rglob("*.py")):
        hits = exits_in(ast.parse(path.read_text(encoding="utf-8")))
        if hits:
            found[str(path.relative_to(ROOT))] = hits
    assert found == {}


def test_the_walk_finds_each_way_of_exiting():
    source = (
        "import sys\nraise SystemExit('x')\nsys.exit(1)\ntry:\n    pass\nexcept SystemExit:\n    pass\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    assert exits_in(ast.parse(source)) == ["2: SystemExit", "3: sys.exit", "6: SystemExit"]


@pytest.mark.parametrize(
    ("error", "code"), [(ParamsError("k"), 2), (InputError("f:1: x"), 2), (EndpointError("e"), 3)]
)
def test_each_typed_error_has_its_exit_status(error, code):
    assert exit_code(error) == code


@pytest.mark.parametrize(("error", "code"), [("ParamsError", 2), ("InputError", 2), ("EndpointError", 3)])
def test_a_stage_prints_a_typed_error_as_one_line_and_its_exit_status(tmp_path, error, code):
    module = "common.params" if error == "ParamsError" else "common.records"
    script = (
        f"import stages\nfrom tuneline.{module} import {error}\nraise {error}('augment.model: the fix')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (code, "error: augment.model: the fix\n")


def test_any_other_exception_in_a_stage_is_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "import stages\nraise RuntimeError('a bug')"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        done.returncode == 1 and done.stderr.startswith("Traceback") and "RuntimeError: a bug" in done.stderr
    )
