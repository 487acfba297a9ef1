"""Write docs/params.md, the key reference, from params.yaml's keys, values and comments.

`dvc exp run -S` rewrites params.yaml and drops its comments, so what a key means must not live only
there: this page keeps it. tests/test_params_doc.py fails when the page is out of date.

    python tools/params_doc.py          # rewrite docs/params.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
PAGE = ROOT / "docs" / "params.md"
KEY = re.compile(r"^(?P<indent> *)(?P<dash>- )?(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")
HEADER = """# params.yaml, key by key

Every stage checks all of `params.yaml` when it starts (`tuneline check` does the same): an unknown key
fails with the key it probably meant, a missing or mistyped one names the key and the fix. Each section
maps onto a frozen dataclass in `tuneline/common/params.py`; a stage reads `base` and its own section, and
`dvc.yaml` lists exactly those keys. Change a value and run `dvc repro`, or try it with
`dvc exp run --temp -S section.key=value` ([workflows.md](workflows.md#experiments)).

This page is written from `params.yaml` by `python tools/params_doc.py`: the comments below are the
ones in the file, kept here because `dvc exp run -S` rewrites the file without them.
"""


def split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of the text after a key's colon; a '#' inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(text):
        if ch in "\"'" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or text[i - 1] == " "):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def rows(lines: list[str]) -> list[tuple[str, str, str]]:
    """(key path, value as written, comment) for every key, in file order; block comments above a key
    and comment lines under it (deeper indented, no key) are joined to its comment."""
    out: list[list[str]] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#") and not out:
            continue  # the file's own header; HEADER says it better
        if stripped.startswith("#"):
            indent = len(line) - len(line.lstrip())
            if not pending and stack and indent > stack[-1][0]:
                out[-1][2] = (out[-1][2] + " " + stripped.lstrip("# ")).strip()
            else:
                pending.append(stripped.lstrip("#").strip())
            continue
        match = KEY.match(line)
        if not match:
            continue
        indent = len(match["indent"]) + (2 if match["dash"] else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        name = match["key"] if not match["dash"] else f"[].{match['key']}"
        path = f"{parent}.{name}".lstrip(".").replace(".[]", "[]")
        value, comment = split_comment(match["rest"])
        out.append([path, value, " ".join([*pending, comment]).strip()])
        pending = []
        if match["dash"]:
            stack.append((indent - 2, f"{parent}[]".lstrip(".")) if parent else (indent - 2, "[]"))
        stack.append((indent, path))
    return [tuple(r) for r in out]


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def page(params_text: str) -> str:
    """The Markdown page for `params_text`: one table per top-level section."""
    parts = [HEADER]
    for path, value, comment in rows(params_text.splitlines()):
        if "." not in path and "[" not in path:
            parts.append(
                f"\n## `{path}`\n"
                + (f"\n{comment}\n" if comment else "")
                + "\n| key | default | what it is |\n|---|---|---|"
            )
            continue
        shown = f"`{cell(value)}`" if value else ""
        parts.append(f"| `{path}` | {shown} | {cell(comment)} |")
    return "\n".join(parts) + "\n"


def main() -> int:
    PAGE.write_text(page(PARAMS.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
