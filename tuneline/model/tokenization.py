"""Alpaca records rendered through a chat template, tokenized, label-masked and optionally packed.

Each rendered piece of a conversation is tokenized on its own and the pieces are concatenated, so
the label mask covers exactly the assistant answers (`train_on_prompt` puts the prompt in the
loss too). The stage does this a batch of records at a time: their conversations rendered in two
template calls and all their pieces tokenized in one fast-tokenizer call, which gives the same ids
as one call per piece. Packing puts whole examples into sequences of at most `max_length` tokens,
best fit decreasing, with position ids restarting at 0 for each example, which transformers turns
into a block-diagonal attention mask (flash-attention: its variable-length kernel, given the
examples' boundaries by `collate`): packed examples never see each other.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from functools import partial

from tuneline.data.alpaca import to_messages
from tuneline.model.templates import segments_many

IGNORE = -100


def encode(tokenizer, record: dict, template: str, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record; labels are IGNORE outside the answers."""
    return encode_many(tokenizer, [record], template, train_on_prompt)[0]


def piece_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each text, tokenized on its own without added special tokens.

    A fast tokenizer's Rust backend does it in one call that computes no character offsets
    (`encode_batch_fast`), which the ids never need, when the backend is set as the tokenizer's
    own call would set it (no truncation or padding, special tokens split as configured). Other
    tokenizers go through their call, asked for the ids only (attention masks and type ids for
    every piece cost as much again in Python); that call also resets the backend's settings.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]


def encode_many(
    tokenizer, records: list[dict], template: str, train_on_prompt: bool
) -> list[tuple[list[int], list[int]]]:
    """`encode` of many records: every piece of every record tokenized in one call, each piece on its own."""
    pieces = segments_many(tokenizer, [to_messages(r) for r in records], template)
    texts = [text for record_pieces in pieces for text, _ in record_pieces]
    ids_of_piece = iter(piece_ids(tokenizer, texts))
    encoded = []
    for record_pieces in pieces:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, is_answer in record_pieces:
            ids = next(ids_of_piece)
            input_ids += ids
            labels += ids if (is_answer or train_on_prompt) else [IGNORE] * len(ids)
        if labels:
            labels[0] = (
                IGNORE  # nothing predicts the first token; in a pack, its predecessor is another example
            )
        encoded.append((input_ids, labels))
    return encoded


def shortened(
    tokenizer, record: dict, template: str, max_length: int, train_on_prompt: bool
) -> tuple[list[int], list[int]] | None:
    """The record encoded with its oldest history turns left out, as few as make it fit in
    `max_length` tokens; None when even without history it does not fit. Every shorter history
    is rendered and tokenized in one `encode_many` call."""
    history = record.get("history") or []
    shorter = [{**record, "history": history[k:]} for k in range(1, len(history) + 1)]
    for input_ids, labels in encode_many(tokenizer, shorter, template, train_on_prompt) if shorter else []:
        if len(input_ids) <= max_length:
            return input_ids, labels
    return None


def fit_length(
    input_ids: list[int], labels: list[int], max_length: int, overlong: str, shorter=None
) -> tuple[list[int], list[int], str]:
    """Apply the length limit; the status says what happened: ok | truncated | dropped_overlong |
    dropped_no_answer.

    Tokens are never cut off the end: that would keep an answer without its end of turn and teach
    the model not to stop. With `overlong: truncate`, an overlong record is replaced by `shorter()`
    (`shortened`: the same record with its oldest history turns left out) when that fits
    (truncated); a record that fits in no way, and every overlong one with `overlong: drop`, is
    dropped (dropped_overlong), to be counted and listed in the rejects.
    """
    status = "ok"
    if len(input_ids) > max_length:
        fitting = shorter() if overlong == "truncate" and shorter is not None else None
        if fitting is None:
            return [], [], "dropped_overlong"
        (input_ids, labels), status = fitting, "truncated"
    if all(label == IGNORE for label in labels):
        return [], [], "dropped_no_answer"
    return input_ids, labels, status


EXAMPLE_COLUMNS = ("input_ids", "labels", "length", "original_length", "answer_tokens", "status")


def example_row(
    input_ids: list[int], labels: list[int], max_length: int, overlong: str, shorter=None
) -> dict:
    """One encoded record after the length limit (`fit_length`), with the counts the stage reports
    (length, original_length, answer_tokens, status)."""
    original = len(input_ids)
    input_ids, labels, status = fit_length(input_ids, labels, max_length, overlong, shorter)
    answer_tokens = sum(1 for label in labels if label != IGNORE)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "length": len(input_ids),
        "original_length": original,
        "answer_tokens": answer_tokens,
        "status": status,
    }


def tokenize_example(
    record: dict, tokenizer, template: str, max_length: int, overlong: str, train_on_prompt: bool
) -> dict:
    """One record to input_ids, labels, and the counts the stage reports."""
    input_ids, labels = encode(tokenizer, record, template, train_on_prompt)
    return example_row(
        input_ids,
        labels,
        max_length,
        overlong,
        partial(shortened, tokenizer, record, template, max_length, train_on_prompt),
    )


def tokenize_batch(
    batch: dict[str, list], tokenizer, template: str, max_length: int, overlong: str, train_on_prompt: bool
) -> dict[str, list]:
    """The batched `datasets.map` function: a batch of records (columns of values) to the columns of
    `tokenize_example`, row for row the same."""
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    rows = [
        example_row(
            ids,
            labels,
            max_length,
            overlong,
            partial(shortened, tokenizer, record, template, max_length, train_on_prompt),
        )
        for record, (ids, labels) in zip(records, encode_many(tokenizer, records, template, train_on_prompt))
    ]
    return {key: [row[key] for row in rows] for key in EXAMPLE_COLUMNS}


def packed_row(examples: list[tuple[list[int], list[int]]]) -> dict:
    """Whole examples concatenated into one sequence, position ids restarting at 0 for each."""
    return {
        "input_ids": [t for ids, _ in examples for t in ids],
        "labels": [t for _, labels in examples for t in labels],
        "position_ids": [i for ids, _ in examples for i in range(len(ids))],
        "num_examples": len(examples),
    }


def pack(examples: Iterator[tuple[list[int], list[int]]], max_length: int) -> Iterator[dict]:
    """Greedy packing in order: whole examples into sequences of at most `max_length` tokens."""
    current: list[tuple[list[int], list[int]]] = []
    size = 0
    for ex_ids, ex_labels in examples:
        if current and size + len(ex_ids) > max_length:
            yield packed_row(current)
            current, size = [], 0
        current.append((ex_ids, ex_labels))
        size += len(ex_ids)
    if current:
        yield packed_row(current)


def best_fit_decreasing(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of the examples grouped into bins of at most `max_length` tokens, best fit decreasing:
    longest first, each into the bin it leaves least room in, else into a new bin. Fewer, fuller
    bins than packing in order (in order, a long example closes a bin that a later short one could
    have filled). Ties go to the earlier example and the earlier bin, so the result is deterministic;
    an example longer than `max_length` gets a bin of its own."""
    bins: list[list[int]] = []
    room: list[
        tuple[int, int]
    ] = []  # (tokens left, bin number), sorted: the best fit is the first that is big enough
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect_left(room, (lengths[i], -1))
        if k < len(room):
            left, b = room.pop(k)
        else:
            left, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - lengths[i] > 0:
            insort(room, (left - lengths[i], b))
    return bins


def pack_batch(batch: dict, max_length: int) -> dict:
    """The batched `datasets.map` function that packs one batch of tokenized examples, best fit decreasing."""
    examples = list(zip(batch["input_ids"], batch["labels"]))
    packs = [
        packed_row([examples[i] for i in b])
        for b in best_fit_decreasing([len(ids) for ids, _ in examples], max_length)
    ]
    return {key: [p[key] for p in packs] for key in ("input_ids", "labels", "position_ids", "num_examples")}


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """The share of padding tokens when sequences of `lengths` are batched in order and padded to the
    longest."""
    total = padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        total += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 0.0 if padded == 0 else 1 - total / padded


def varlen_metadata(position_ids):
    """Flash-attention's variable-length arguments for packed rows: where each example starts in the
    batch's tokens taken row after row (`cu_seq_lens_*`, int32, ending with the total) and the
    longest example (`max_length_*`). An example starts wherever its position ids restart at 0;
    a row's padding, whose positions restart too, is an example of its own with no labels. These
    are the keys transformers' DataCollatorWithFlattening and TRL's padding-free collator return."""
    import torch

    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)
    cu_seq_lens = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def collate(features: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch. Unpacked batches carry an attention mask. Packed batches carry position
    ids restarting at 0 for each example and no attention mask, so each example attends only to
    itself on every attention implementation: SDPA and eager build a block-diagonal mask of each
    row from the position ids; flash-attention (and the kernels one) reads the variable-length
    arguments (`varlen_metadata`) and runs its varlen kernel over the batch's tokens. Without
    them it would find the examples' boundaries from the position ids only in a batch of one row,
    and attend each row of a larger batch as one causal sequence. Padding gets positions of its
    own and no loss. Packed batches also say `use_cache=False`: a model that builds a KV cache
    ignores the position ids' boundaries and lets packed examples attend to each other, and
    whether it builds one depends on its config."""
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
    if not packed:
        return tensors
    return {**tensors, **varlen_metadata(tensors["position_ids"]), "use_cache": False}
