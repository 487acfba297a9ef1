"""Reading and writing the JSON Lines files that stages pass between each other.

A record is a dict with the Alpaca fields (`instruction`, `input`, `output`, `system`,
`history`) plus provenance: `id` (a content hash), `source` (seed | crawl | dataset | generated),
and where known `url` and `category`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")


class InputError(ValueError):
    """A bad input file: the message names the file, the line and the field."""


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON Lines file; a bad line fails naming the file and line."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    for _, value in iter_numbered_jsonl(path):
        yield value


def iter_numbered_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line fails naming file and line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(value, dict):
                raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(value).__name__}")
            yield line_no, value


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records one per line (UTF-8, keys in a stable order); return how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_json(path: str | Path, value: Any) -> None:
    """Write JSON with sorted keys and a final newline, so the file diffs cleanly in git."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def content_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def record_id(record: dict) -> str:
    """The id of a record: a hash of its Alpaca fields, so the same content gets the same id."""
    return content_hash(*(record.get(k) for k in ALPACA_FIELDS))


def with_id(record: dict) -> dict:
    """The record with its `id` set (kept if it already has one)."""
    if record.get("id"):
        return record
    return {**record, "id": record_id(record)}
