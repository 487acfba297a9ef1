"""The Alpaca format: validation, the train/val/test split, LLaMA-Factory and OpenAI exports.

An Alpaca record has `instruction` (required), `input` (may be ""), `output` (required),
`system` (may be "") and `history` (a list of [instruction, answer] pairs, may be empty).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

from tuneline.templates import to_messages

# Characters of scripts written without spaces count one token each; other text counts words.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")


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
            problems.append(("history", f"should be a list of [instruction, answer] pairs, got {type(history).__name__}"))
        else:
            for i, turn in enumerate(history):
                if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
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


def split(records: list[dict], val_fraction: float, test_fraction: float, seed: int) -> tuple[list, list, list]:
    """A deterministic train/val/test split, stratified by `source`.

    Records are ordered by id within each source and shuffled with `seed`, so the split depends
    only on the records and the seed, never on input order.
    """
    by_source: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_source[str(record.get("source", ""))].append(record)
    train, val, test = [], [], []
    for source in sorted(by_source):
        group = sorted(by_source[source], key=lambda r: r["id"])
        random.Random(f"{seed}:{source}").shuffle(group)
        n_test = round(len(group) * test_fraction)
        n_val = round(len(group) * val_fraction)
        test += group[:n_test]
        val += group[n_test : n_test + n_val]
        train += group[n_test + n_val :]
    return (sorted(train, key=lambda r: r["id"]), sorted(val, key=lambda r: r["id"]), sorted(test, key=lambda r: r["id"]))


def dataset_info(name: str, splits: dict[str, str]) -> dict:
    """LLaMA-Factory's dataset_info.json entries for the split files (`{split: file_name}`)."""
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}
    return {f"{name}_{split}": {"file_name": file, "formatting": "alpaca", "columns": dict(columns)} for split, file in splits.items()}


def to_openai_chat(record: dict) -> dict:
    """A record as one line of OpenAI chat fine-tuning JSONL, history expanded into turns."""
    return {"messages": to_messages(record)}
