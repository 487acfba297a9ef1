"""No module under tuneline/ or stages/ assigns to a third-party module's or class's attributes, to
another object's private attributes, or a function over another object's method: a dependency's
internals are not ours to replace (an upgrade that renames one breaks us, as transformers 5.25 did to
a replaced `ModelManager._load_model`)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("tuneline", "stages", "tests", "bench")

# (file, target as written): where writing to a dependency's object is the design, and why.
ALLOWED: dict[tuple[str, str], str] = {
    (
        "tuneline/model/training.py",
        "model.forward",
    ): "the answer-only head: one model instance's training forward runs "
    "the LM head on labelled positions only (TRL's fused head patches the instance the same way), so peft, "
    "DDP, "
    "FSDP and DeepSpeed, which call forward, train through it; no class or module is changed",
}


def imported_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(third-party, standard library): the names `import x` / `from x import y` bind, by where x comes
    from."""
    names, stdlib = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(alias.name, alias.asname or alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [(node.module, alias.asname or alias.name) for alias in node.names]
        else:
            continue
        for module, bound in modules:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names:
                stdlib.add(bound)
            elif top not in OURS:
                names.add(bound)
    return names, stdlib


def root_name(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def is_function(value: ast.expr | None, defined: set[str]) -> bool:
    """Whether `value` makes a function: a lambda, a `MethodType(...)`, or a function defined in the file."""
    if isinstance(value, ast.Lambda) or (isinstance(value, ast.Name) and value.id in defined):
        return True
    call = value.func if isinstance(value, ast.Call) else None
    return (isinstance(call, ast.Attribute) and call.attr == "MethodType") or (
        isinstance(call, ast.Name) and call.id == "MethodType"
    )


def assigned_attributes(tree: ast.Module) -> list[tuple[ast.Attribute, bool]]:
    """(attribute target, whether a function is assigned to it) of assignments and setattr() calls."""
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            function = is_function(node.value, defined)
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                targets += [
                    (t, function)
                    for t in ast.walk(target)
                    if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store)
                ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) == 3
            and isinstance(node.args[1], ast.Constant)
        ):
            attribute = ast.Attribute(
                value=node.args[0],
                attr=node.args[1].value,
                ctx=ast.Store(),
                lineno=node.lineno,
                col_offset=node.col_offset,
            )
            targets.append((attribute, is_function(node.args[2], defined)))
    return targets


def patches(path: Path) -> list[str]:
    """`file:line target` for each write to a third-party module or class, and for each private
    attribute or function written onto anything but `self`/`cls` (a standard library hook such as
    `sys.excepthook` is meant to be set)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    third_party, stdlib = imported_names(tree)
    found = []
    for target, function in assigned_attributes(tree):
        root = root_name(target.value)
        private = target.attr.startswith("_") and not (
            target.attr.startswith("__") and target.attr.endswith("__")
        )
        if root in third_party or ((private or function) and root not in ("self", "cls", *stdlib)):
            written = ast.unparse(target)
            if (str(path.relative_to(ROOT)), written) not in ALLOWED:
                found.append(f"{path.relative_to(ROOT)}:{target.lineno} {written}")
    return found


def library_files() -> list[Path]:
    return sorted([*(ROOT / "tuneline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")])


def test_nothing_under_tuneline_or_stages_patches_a_dependency():
    found = [hit for path in library_files() for hit in patches(path)]
    assert not found, (
        "writes to a dependency's objects (use public API, or allow-list with the reason):\n"
        + "\n".join(found)
    )


def test_the_check_sees_the_patches_it_forbids(tmp_path):
    """The walk catches what it exists to catch: a replaced class method, a module flag, a private field,
    setattr on an imported class; and leaves alone writes to our own objects."""
    (tmp_path / "tuneline").mkdir()
    bad = tmp_path / "tuneline" / "bad.py"
    bad.write_text(
        "import types\n"
        "import transformers\n"
        "from transformers.cli.serving.model_manager import ModelManager\n"
        "from tuneline.common.params import Train\n"
        "ModelManager._load_model = None\n"
        "transformers.logging.verbosity = 1\n"
        "setattr(ModelManager, 'load', None)\n"
        "def f(model, self):\n"
        "    model._hf_hook = None\n"
        "    model.forward = types.MethodType(f, model)\n"
        "    model.generate = lambda: None\n"
        "    model.name = 'ok'\n"
        "    self._cache = {}\n"
        "    Train.x = 1\n",
        encoding="utf-8",
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = [hit.split(" ", 1)[1] for hit in patches(bad)]
    finally:
        ROOT = saved
    assert sorted(found) == sorted(
        [
            "ModelManager._load_model",
            "transformers.logging.verbosity",
            "ModelManager.load",
            "model._hf_hook",
            "model.forward",
            "model.generate",
        ]
    )
