"""Reading and writing the JSON Lines files that stages pass between each other.

A record is a dict with the Alpaca fields (`instruction`, `input`, `output`, `system`,
`history`) plus provenance: `source` (seed | crawl | dataset | generated), where known `origin`
(the upstream stage's own name for the source), `url` and `category`, and two hashes:

- `content_hash`: a hash of the Alpaca fields alone. Equal text has an equal content hash,
  whichever source it came from; duplicate detection compares it (or a normalised form).
- `id`: the record's identity, unique per input: a hash of its provenance, its content hash
  and, for identical copies from one provenance, the copy's number. The same text arriving as a
  seed and as a dataset row gets two ids, so one can be kept and the other rejected as a
  duplicate *of the kept one's id*. Ids do not change when other records are added or
  reordered, which is what keeps the train/val/test split still (tuneline.data.alpaca.split).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")


class InputError(ValueError):
    """A bad input file: the message names the file, the line and the field."""


class EndpointError(RuntimeError):
    """An LLM or judge endpoint that did not answer, refused the key, or failed more calls than its
    params allow; the message names the params key to check. A stage ends with exit status 3 (a
    user's mistake, ParamsError or InputError, with 2), so a script can tell a service to retry
    from a setting to fix."""


def exit_code(err: BaseException) -> int:
    """The exit status of a stage or `tuneline` command that ends with `err`: 3 for an EndpointError,
    2 for any other error of the one channel (params.ParamsError, InputError, both ValueErrors)."""
    return 3 if isinstance(err, EndpointError) else 2


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
                raise InputError(
                    f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
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


# Sharded outputs. A stage's record output is a directory of JSON Lines shards, part-00000.jsonl,
# part-00001.jsonl, ..., read in name order. Shards are cut by content-defined chunking over the
# records in their order of arrival (input rows, then generated records): a shard ends after a
# record whose id hashes to 0 modulo base.shard_records (once it holds a quarter of that). Where a
# cut falls depends on that record, so appending or inserting records changes only the shards they
# land in (and at most the next, until the cuts fall in step again), and DVC, which
# stores a directory output file by file under each file's content hash, stores only those again.
# (Buckets by id hash would not do: 1% new records land in every bucket.) Names are sequential,
# so name order is reading order without a manifest; a new cut renumbers the shards after it, which
# costs DVC nothing but the directory's listing, since an unchanged shard has an unchanged hash.
SHARD_GLOB = "part-*.jsonl"


def is_shard_end(record: dict, per_shard: int) -> bool:
    """Whether a shard ends after this record: its id (or, without one, its content) hashes to 0 mod
    `per_shard`."""
    key = str(record.get("id") or content_hash(record))
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) % per_shard == 0


def shard_records(records: Iterable[dict], per_shard: int) -> Iterator[list[dict]]:
    """The records cut into shards by content-defined chunking, in their order (see SHARD_GLOB's note).

    A shard holds at least a quarter of `per_shard` records (a cut the hash asks for sooner is skipped),
    so no shard is tiny and an output of fewer records is one shard; the cuts after an edit fall
    back in step with the old ones at the first cut the hash asks for past that minimum.
    """
    shortest = per_shard // 4
    shard: list[dict] = []
    for record in records:
        shard.append(record)
        if len(shard) >= shortest and is_shard_end(record, per_shard):
            yield shard
            shard = []
    if shard:
        yield shard


def write_jsonl_shards(
    directory: str | Path, records: Iterable[dict], per_shard: int, order: Callable[[dict], Any] | None = None
) -> int:
    """Write records, given in arrival order, as the shards of `directory` (replacing what it held);
    `order` sorts the records within each shard (a stage's output order). Return how many were written.

    Fewer than `per_shard` / 4 records (the default's hundred) make one shard, which is the one-file
    output sorted by `order`, byte for byte.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    for i, shard in enumerate(shard_records(records, per_shard)):
        n += write_jsonl(tmp / f"part-{i:05d}.jsonl", sorted(shard, key=order) if order else shard)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return n


def in_arrival_order(rows: list[dict], arrived: Iterable[dict]) -> list[dict]:
    """`rows` (a stage's kept records or rejects, which carry an input record's id) in the order their
    ids arrived in `arrived`, so a stage's shards follow its input's; rows of other ids come last."""
    position = {record.get("id"): i for i, record in enumerate(arrived)}
    return sorted(rows, key=lambda row: position.get(row.get("id"), len(position)))


def shard_files(directory: str | Path) -> list[Path]:
    """The shards of a sharded output, in reading order; a missing directory or an old one-file output
    fails."""
    directory = Path(directory)
    if not directory.is_dir():
        old = directory.with_name(directory.name + ".jsonl")
        was = f" ({old} is an older version's one-file layout)" if old.exists() else ""
        raise InputError(
            f"{directory}: not found{was}; it is a directory of {SHARD_GLOB} shards: run the stage "
            "that writes it (`dvc repro`)"
        )
    return sorted(directory.glob(SHARD_GLOB))


def iter_numbered_jsonl_dir(directory: str | Path) -> Iterator[tuple[Path, int, dict]]:
    """(shard file, line number, object) for each record of a sharded output, streaming, in order."""
    for path in shard_files(directory):
        for line_no, value in iter_numbered_jsonl(path):
            yield path, line_no, value


def iter_jsonl_dir(directory: str | Path) -> Iterator[dict]:
    """The records of a sharded output, streaming, shard by shard in name order."""
    for _, _, value in iter_numbered_jsonl_dir(directory):
        yield value


def read_jsonl_dir(directory: str | Path) -> list[dict]:
    """All records of a sharded output, in order."""
    return list(iter_jsonl_dir(directory))


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


def text_hash(record: dict) -> str:
    """The content hash of a record: a hash of its Alpaca fields only (not of its provenance)."""
    return content_hash(*(record.get(k) for k in ALPACA_FIELDS))


def provenance(record: dict) -> str:
    """Where a record came from, as it enters its id: source, origin and url."""
    return "|".join(str(record.get(k) or "") for k in ("source", "origin", "url"))


def record_id(record: dict, copy: int = 0) -> str:
    """The identity of a record: provenance + content hash (+ the copy number of identical twins)."""
    return content_hash(provenance(record), text_hash(record), *([copy] if copy else []))


def with_id(record: dict) -> dict:
    """The record with `content_hash` and `id` set (an `id` it already has is kept)."""
    record = {**record, "content_hash": text_hash(record)}
    if not record.get("id"):
        record["id"] = record_id(record)
    return record


def with_ids(records: Iterable[dict]) -> list[dict]:
    """Records of one input with unique ids: identical copies from one provenance are numbered.

    Copy numbers follow input order, so adding or moving other records changes no id.
    """
    copies: dict[str, int] = {}
    out = []
    for record in records:
        record = {**record, "content_hash": text_hash(record)}
        key = content_hash(provenance(record), record["content_hash"])
        record["id"] = record_id(record, copies.get(key, 0))
        copies[key] = copies.get(key, 0) + 1
        out.append(record)
    return out


def duplicate_ids(records: Iterable[dict]) -> list[str]:
    """Ids that occur more than once (a broken invariant: every input must have its own id)."""
    seen: set[str] = set()
    twice = []
    for record in records:
        if record.get("id") in seen:
            twice.append(record["id"])
        seen.add(record.get("id"))
    return sorted(set(twice))


def tokenizer_hash(name: str) -> str:
    """A content hash of a local tokenizer's files (the hub id and revision stand for it otherwise)."""
    path = Path(name)
    if not path.is_dir():
        return ""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name.startswith("tokenizer") or f.name in (
            "special_tokens_map.json",
            "chat_template.jinja",
            "vocab.json",
            "merges.txt",
        ):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ChosenModel:
    """The base model the pipeline tunes, as choose wrote it (base.selected) or pretrain passed it on
    (base.tuning_base): what loading it needs, and whether it is an API model, used as is."""

    name: str
    name_or_path: str  # a hub id or a local directory
    revision: str | None
    trust_remote_code: bool
    api: bool
    record: dict  # the file's mapping as written (why, score, tied_with, ...), for what passes it on


def chosen_model(record: dict) -> ChosenModel:
    """The ChosenModel of a base.selected / base.tuning_base mapping."""
    return ChosenModel(
        name=record["name"],
        name_or_path=record["model"],
        revision=record.get("revision"),
        trust_remote_code=record.get("trust_remote_code", False),
        api=record["kind"] == "api",
        record=record,
    )


def read_chosen(path: str | Path) -> ChosenModel:
    """The ChosenModel in the JSON file `path` (base.selected or base.tuning_base)."""
    return chosen_model(read_json(path))


def skipped_for_api(
    chosen: ChosenModel, stage: str, message: str, writes: dict[Path, Any], clear: Path | None = None
) -> bool:
    """Whether the stage skips `chosen`, an API model that no local stage can tune, score or export.
    Then it prints `<stage>: skipped, <message>`, empties `clear` (an output directory) and writes
    each of `writes` (a dict as JSON, a list as JSON Lines, a str as text), so that every output the
    stage declares exists."""
    if not chosen.api:
        return False
    print(f"{stage}: skipped, {message}")
    if clear is not None:
        shutil.rmtree(clear, ignore_errors=True)
    for path, content in writes.items():
        if isinstance(content, dict):
            write_json(path, content)
        elif isinstance(content, list):
            write_jsonl(path, content)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content, encoding="utf-8")
    return True
