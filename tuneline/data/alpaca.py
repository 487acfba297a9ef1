"""The Alpaca format: validation, the train/val/test split, LLaMA-Factory and OpenAI exports.

An Alpaca record has `instruction` (required), `input` (may be ""), `output` (required),
`system` (may be "") and `history` (a list of [instruction, answer] pairs, may be empty).
"""

from __future__ import annotations

import re
from collections import Counter

from tuneline.common.records import content_hash, with_id

# Characters of scripts written without spaces count one token each; other text counts words.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+"
)


def count_tokens(text: str) -> int:
    """A tokenizer-free length: words, with each CJK character counted as one."""
    return len(_WORD.findall(text))


def record_problems(record: dict, max_tokens: int) -> list[tuple[str, str]]:
    """(field, reason) for each way `record` is not a valid Alpaca record; empty when valid."""
    problems = []
    for field in ("instruction", "output"):
        value = record.get(field)
        if value is None:
            problems.append((field, "missing"))
        elif not isinstance(value, str):
            problems.append((field, f"should be a string, got {type(value).__name__}"))
        elif not value.strip():
            problems.append((field, "empty"))
    for field in ("input", "system"):
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            problems.append((field, f"should be a string, got {type(value).__name__}"))
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            problems.append(
                ("history", f"should be a list of [instruction, answer] pairs, got {type(history).__name__}")
            )
        else:
            for i, turn in enumerate(history):
                if not (
                    isinstance(turn, (list, tuple))
                    and len(turn) == 2
                    and all(isinstance(t, str) for t in turn)
                ):
                    problems.append((f"history[{i}]", "should be a pair of 2 strings [instruction, answer]"))
    if not problems:
        n = count_tokens(render_text(record))
        if n > max_tokens:
            problems.append(("*", f"over the token budget: {n} > build.max_tokens {max_tokens}"))
    return problems


def render_text(record: dict) -> str:
    """All the text of a record, for length budgets."""
    parts = [record.get("system") or "", record["instruction"], record.get("input") or "", record["output"]]
    for user, answer in record.get("history") or []:
        parts += [user, answer]
    return "\n".join(parts)


def to_alpaca(record: dict) -> dict:
    """A valid record in the full Alpaca form, with its provenance (`id`, `source`, `category`)."""
    out = {
        "instruction": record["instruction"],
        "input": record.get("input") or "",
        "output": record["output"],
        "system": record.get("system") or "",
        "history": [list(turn) for turn in record.get("history") or []],
    }
    for key in ("id", "source", "category", "url"):
        if record.get(key) is not None:
            out[key] = record[key]
    return out


def split_of(record: dict, val_fraction: float, test_fraction: float, seed: int) -> str:
    """train, val or test for one record, from a hash of its identity (`id`, `source`) and `seed`.

    The hash maps the record to a number u in [0, 1): u < test_fraction is test, the next
    val_fraction is val, the rest train. It depends on nothing but the record and the seed, so
    adding, removing or reordering other records never moves a record to another split.
    """
    u = int(content_hash(seed, str(record.get("source", "")), record["id"]), 16) / 16**16
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def split(
    records: list[dict], val_fraction: float, test_fraction: float, seed: int, generated_in_test: bool = True
) -> tuple[list, list, list]:
    """A train/val/test split that never moves: each record's split is `split_of` its identity.
    Without `generated_in_test`, a generated record (source: generated) drawn for test goes to train:
    the test split then scores the model on human-written and crawled records only.

    Records are stratified by `source` in expectation: every source's records are assigned by
    the same fractions, independently, and build.json reports the counts per source and split.
    Each part is sorted by id, so the files depend only on the records and the seed.
    """
    parts: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for record in sorted(records, key=lambda r: r["id"]):
        name = split_of(record, val_fraction, test_fraction, seed)
        if name == "test" and not generated_in_test and record.get("source") == "generated":
            name = "train"
        parts[name].append(record)
    return parts["train"], parts["val"], parts["test"]


def split_by_source(parts: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """{source: {split: count}}, for metrics: how each source is spread over the splits."""
    counts: dict[str, dict[str, int]] = {}
    for name, part in parts.items():
        for record in part:
            row = counts.setdefault(str(record.get("source", "")), {"train": 0, "val": 0, "test": 0})
            row[name] += 1
    return dict(sorted(counts.items()))


def validate(records: list[tuple[int, dict]], source: str, max_tokens: int) -> tuple[list[dict], list[dict]]:
    """(valid records in full Alpaca form, rejects naming file, line, field and reason)."""
    kept, rejects = [], []
    for line_no, record in records:
        problems = record_problems(record, max_tokens)
        if problems:
            rejects.append(
                {
                    "file": source,
                    "line": line_no,
                    "field": problems[0][0],
                    "id": record.get("id"),
                    "reason": "; ".join(f"{f}: {r}" for f, r in problems),
                    "record": record,
                }
            )
            continue
        kept.append(to_alpaca(with_id(record)))
    return kept, rejects


def nothing_to_build(
    clean_rejects: list[dict], build_rejects: list[dict], clean_dir: str, metrics_dir: str
) -> str:
    """The error when no record reaches the split files, naming the stage that emptied them."""
    if build_rejects:
        return (
            f"build rejected all {len(build_rejects)} records from {clean_dir}/records/ (first: "
            f"{build_rejects[0]['file']}:{build_rejects[0]['line']}, {build_rejects[0]['reason']}); see the "
            f"rejects file"
        )
    if clean_rejects:
        reasons = Counter(r["reason"] for r in clean_rejects)
        top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
        return (
            f"no records reach build: the clean stage rejected all {len(clean_rejects)} records it received "
            f"({top}); see {clean_dir}/rejects/ and {metrics_dir}/clean.json, and loosen the clean: params"
        )
    return (
        f"no records reach build: {clean_dir}/records/ is empty and the clean stage rejected nothing, "
        "so it received no records: the augment stage (or crawl before it) produced none; see "
        f"{metrics_dir}/augment.json and {metrics_dir}/crawl.json"
    )


def dataset_info(name: str, splits: dict[str, str]) -> dict:
    """LLaMA-Factory's dataset_info.json entries for the split files (`{split: file_name}`)."""
    columns = {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
    }
    return {
        f"{name}_{split}": {"file_name": file, "formatting": "alpaca", "columns": dict(columns)}
        for split, file in splits.items()
    }


def to_openai_chat(record: dict) -> dict:
    """A record as one line of OpenAI chat fine-tuning JSONL, history expanded into turns."""
    return {"messages": to_messages(record)}


def user_content(record: dict) -> str:
    """The user turn of an Alpaca record: the instruction, then the input when there is one."""
    instruction = record["instruction"]
    extra = record.get("input") or ""
    return f"{instruction}\n\n{extra}" if extra else instruction


def to_messages(record: dict, with_answer: bool = True) -> list[dict]:
    """An Alpaca record as chat messages: system, history turns, the user turn, the answer."""
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    for user, assistant in record.get("history") or []:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": user_content(record)})
    if with_answer:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages
