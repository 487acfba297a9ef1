"""Alpaca records rendered through a chat template, tokenized, label-masked and optionally packed.

Each rendered piece of a conversation is tokenized on its own and the pieces are concatenated, so
the label mask covers exactly the assistant answers (`train_on_prompt` puts the prompt in the
loss too). Packing concatenates whole examples with position ids restarting at 0 for each, which
transformers turns into a block-diagonal attention mask: packed examples never see each other.
"""

from __future__ import annotations

from collections.abc import Iterator

from tuneline.templates import segments, to_messages

IGNORE = -100


def encode(tokenizer, record: dict, template: str, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record; labels are IGNORE outside the answers."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in segments(tokenizer, to_messages(record), template):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if (is_answer or train_on_prompt) else [IGNORE] * len(ids)
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token; in a pack, its predecessor is another example
    return input_ids, labels


def fit_length(input_ids: list[int], labels: list[int], max_length: int, overlong: str) -> tuple[list[int], list[int], str]:
    """Apply the length limit; the status says what happened: ok | truncated | dropped_overlong | dropped_no_answer."""
    status = "ok"
    if len(input_ids) > max_length:
        if overlong == "drop":
            return [], [], "dropped_overlong"
        input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
    if all(label == IGNORE for label in labels):
        return [], [], "dropped_no_answer"
    return input_ids, labels, status


def tokenize_example(record: dict, tokenizer, template: str, max_length: int, overlong: str, train_on_prompt: bool) -> dict:
    """The `datasets.map` function: one record to input_ids, labels, and the counts the stage reports
    (length, original_length, answer_tokens, status)."""
    input_ids, labels = encode(tokenizer, record, template, train_on_prompt)
    original = len(input_ids)
    input_ids, labels, status = fit_length(input_ids, labels, max_length, overlong)
    answer_tokens = sum(1 for label in labels if label != IGNORE)
    return {"input_ids": input_ids, "labels": labels, "length": len(input_ids), "original_length": original,
            "answer_tokens": answer_tokens, "status": status}


def pack(examples: Iterator[tuple[list[int], list[int]]], max_length: int) -> Iterator[dict]:
    """Greedy packing in order: whole examples into sequences of at most `max_length` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    count = 0
    for ex_ids, ex_labels in examples:
        if ids and len(ids) + len(ex_ids) > max_length:
            yield {"input_ids": ids, "labels": labels, "position_ids": positions, "num_examples": count}
            ids, labels, positions, count = [], [], [], 0
        ids = ids + ex_ids
        labels = labels + ex_labels
        positions = positions + list(range(len(ex_ids)))
        count += 1
    if ids:
        yield {"input_ids": ids, "labels": labels, "position_ids": positions, "num_examples": count}


def pack_batch(batch: dict, max_length: int) -> dict:
    """The batched `datasets.map` function that packs one batch of tokenized examples."""
    packs = list(pack(zip(batch["input_ids"], batch["labels"]), max_length))
    return {key: [p[key] for p in packs] for key in ("input_ids", "labels", "position_ids", "num_examples")}


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """The share of padding tokens when sequences of `lengths` are batched in order and padded to the longest."""
    total = padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        total += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 0.0 if padded == 0 else 1 - total / padded


def collate(features: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch. Packed batches carry position ids and no attention mask, so each
    example attends only to itself (padding-free: SDPA gets a block-diagonal mask, flash-attention
    its variable-length kernel); padding gets positions of its own and no loss. They also say
    `use_cache=False`: a model that builds a KV cache ignores the position ids' boundaries and lets
    packed examples attend to each other, and whether it builds one depends on its config."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "labels": []}
    packed = "position_ids" in features[0]
    batch["position_ids" if packed else "attention_mask"] = []
    for f in features:
        n = len(f["input_ids"])
        pad = width - n
        batch["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * pad)
        batch["labels"].append(list(f["labels"]) + [IGNORE] * pad)
        if packed:
            batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * n + [0] * pad)
    tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    return {**tensors, "use_cache": False} if packed else tensors
