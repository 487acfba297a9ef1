"""Render, tokenize, label-mask and (optionally) pack the Alpaca train/val files.

Reads:  base.alpaca_dir/{train,val}.json, base.tuning_base (the chosen base model, whose tokenizer
        and chat template are used; its tokenizer hash is part of that file), `tokenize:`.
Writes: base.tokenized_dir/{train,val} (datasets saved with save_to_disk: input_ids, labels,
        and position_ids when packed), base.tokenized_dir/chat_template.jinja (the template used),
        base.tokenized_dir/rejects.jsonl (records dropped for length, with the reason),
        base.metrics_dir/tokenize.json.
Run:    python -m stages.tokenize
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset

from stages import run
from tuneline.common import params
from tuneline.common.records import (
    InputError,
    read_chosen,
    read_json,
    skipped_for_api,
    write_json,
    write_jsonl,
)
from tuneline.model.modeling import load_tokenizer
from tuneline.model.templates import chat_template_for, with_fixed_date
from tuneline.model.tokenization import pack_batch, padding_fraction, tokenize_batch


def tokenize_split(path: Path, tokenizer, p, pack: bool, cache_dir: str) -> tuple[Dataset, dict, list[dict]]:
    """One split tokenized (and packed when asked), with its counts and the records it dropped."""
    records = Dataset.from_json(str(path), cache_dir=cache_dir)
    if len(records) == 0:
        raise InputError(f"tokenize: {path} has no records; check metrics/build.json")
    # Batched: a batch's conversations are rendered in two template calls and its pieces tokenized
    # in one call, which gives the same rows as tokenizing record by record.
    tokenized = records.map(
        tokenize_batch,
        batched=True,
        # main() has put the template to use, its date fixed, on the tokenizer.
        fn_kwargs=dict(
            tokenizer=tokenizer,
            template="auto",
            max_length=p.max_length,
            overlong=p.overlong,
            train_on_prompt=p.train_on_prompt,
        ),
        remove_columns=records.column_names,
        num_proc=p.num_proc if p.num_proc > 1 else None,
        desc=f"tokenize {path.name}",
    )
    # Columns read straight from Arrow (`dataset[column]` iterates row by row: a tenth of the stage's
    # time at 50,000 records), from the mapped dataset, which has no filter's index mapping over it.
    statuses, original_lengths = (tokenized.data.column(c).to_pylist() for c in ("status", "original_length"))
    status = Counter(statuses)
    dropped = [i for i, s in enumerate(statuses) if s.startswith("dropped")]
    rejects = [
        {
            "file": str(path),
            "index": i,
            "id": records[i].get("id"),
            "reason": statuses[i],
            "tokens": original_lengths[i],
            "max_length": p.max_length,
        }
        for i in dropped
    ]
    kept = tokenized
    if dropped:
        kept = tokenized.filter(
            lambda batch: [not s.startswith("dropped") for s in batch], input_columns="status", batched=True
        )
    keep = set(range(len(statuses))).difference(dropped)
    lengths = [n for i, n in enumerate(tokenized.data.column("length").to_pylist()) if i in keep]
    answer_tokens = [n for i, n in enumerate(tokenized.data.column("answer_tokens").to_pylist()) if i in keep]
    counts = {
        "records_in": len(records),
        "records_out": len(kept),
        "truncated": status.get("truncated", 0),
        "dropped_overlong": status.get("dropped_overlong", 0),
        "dropped_no_answer": status.get("dropped_no_answer", 0),
        "tokens": sum(lengths),
        "answer_tokens": sum(answer_tokens),
        "padding_fraction_unpacked": round(padding_fraction(lengths, 8), 4),
    }
    kept = kept.remove_columns(["length", "original_length", "answer_tokens", "status"])
    if pack:
        kept = kept.map(
            pack_batch,
            batched=True,
            batch_size=1000,
            fn_kwargs=dict(max_length=p.max_length),
            remove_columns=kept.column_names,
            desc=f"pack {path.name}",
        )
        counts["packed_sequences"] = len(kept)
        # the lengths straight from the Arrow offsets: no packed ids become Python lists
        packed_lengths = pc.list_value_length(kept.data.column("input_ids")).to_pylist()
        counts["padding_fraction_packed"] = round(padding_fraction(packed_lengths, 8), 4)
    return kept, counts, rejects


def pin_fingerprint(saved: Path) -> None:
    """Replace the random fingerprint `datasets` writes into state.json by a hash of the data,
    so the same tokens give the same DVC hash on every run. The Arrow files are hashed in chunks
    (the digest of their concatenation, as before), never held in memory whole."""
    state = read_json(saved / "state.json")
    digest = hashlib.sha256()
    for arrow in sorted(saved.glob("*.arrow")):
        with open(arrow, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    state["_fingerprint"] = digest.hexdigest()[:16]
    write_json(saved / "state.json", state)


def main() -> None:
    base, p = params.load("base", "tokenize")
    chosen = read_chosen(base.tuning_base)
    out_dir = Path(base.tokenized_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    msg = f"the chosen model {chosen.name} is an API model used as is: nothing to tokenize or train"
    if skipped_for_api(
        chosen,
        "tokenize",
        msg,
        {out_dir / "SKIPPED.json": {"reason": msg}, Path(base.metrics_dir) / "tokenize.json": {"skipped": 1}},
    ):
        return

    tokenizer = load_tokenizer(chosen.name_or_path, chosen.revision, chosen.trust_remote_code)
    # The template actually used travels with the data, so training saves it with the model. A
    # template that prints today's date (Llama 3's strftime_now) prints tokenize.template_date
    # instead: the same records give the same tokens on every day.
    try:
        tokenizer.chat_template = with_fixed_date(chat_template_for(tokenizer, p.template), p.template_date)
    except ValueError as err:
        raise params.ParamsError(f"tokenize: tokenize.template_date {p.template_date!r}: {err}") from None
    (out_dir / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    metrics, rejects = {}, []
    with tempfile.TemporaryDirectory() as cache_dir:
        for split in ("train", "val"):
            ds, counts, dropped = tokenize_split(
                Path(base.alpaca_dir) / f"{split}.json",
                tokenizer,
                p,
                pack=p.packing and split == "train",
                cache_dir=cache_dir,
            )
            ds.save_to_disk(str(out_dir / split))
            pin_fingerprint(out_dir / split)
            metrics[split] = counts
            rejects += dropped
            print(f"tokenize: {split}: {counts}")
    # Nothing is dropped silently: each dropped record, with its reason and length, is listed here.
    write_jsonl(out_dir / "rejects.jsonl", rejects)
    write_json(Path(base.metrics_dir) / "tokenize.json", metrics)


if __name__ == "__main__":
    run(main)
