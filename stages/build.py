"""Build the Alpaca training files from the cleaned records.

Reads:  base.clean_dir/records/ (shards; and rejects/, to say which stage emptied the data when
        no record is left)
Writes: base.alpaca_dir/{train,val,test}.json (Alpaca: instruction, input, output, system, history),
        dataset_info.json (so the files load in LLaMA-Factory unchanged),
        openai_{train,val,test}.jsonl (OpenAI chat fine-tuning format),
        rejects.jsonl (shard file, line, field and reason of every record left out),
        base.metrics_dir/build.json
Each record's split comes from a hash of its id and base.seed (tuneline.data.alpaca.split_of): adding
records never moves an earlier one to another split, so the test set of two commits agrees.
Run:    python -m stages.build
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from stages import run
from tuneline.common import params
from tuneline.common.records import (
    InputError,
    duplicate_ids,
    iter_numbered_jsonl,
    read_jsonl_dir,
    shard_files,
    write_json,
    write_jsonl,
)
from tuneline.data.alpaca import (
    dataset_info,
    nothing_to_build,
    split,
    split_by_source,
    to_openai_chat,
    validate,
)


def main() -> None:
    base, p = params.load("base", "build")
    source = Path(base.clean_dir) / "records"
    out_dir = Path(base.alpaca_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)

    kept, rejects = [], []
    for shard in shard_files(source):
        shard_kept, shard_rejects = validate(list(iter_numbered_jsonl(shard)), str(shard), p.max_tokens)
        kept += shard_kept
        rejects += shard_rejects
    for r in rejects:
        print(f"build: {r['file']}:{r['line']}: {r['reason']}")
    if not kept:
        clean_rejects = Path(base.clean_dir) / "rejects"
        raise InputError(
            nothing_to_build(
                read_jsonl_dir(clean_rejects) if clean_rejects.exists() else [],
                rejects,
                base.clean_dir,
                base.metrics_dir,
            )
        )
    twice = duplicate_ids(kept)
    if twice:
        raise InputError(
            f"{source}: {len(twice)} ids occur more than once, first {twice[0]}; rerun the clean stage"
        )

    train, val, test = split(kept, p.val_fraction, p.test_fraction, base.seed, p.generated_in_test)
    files = {}
    for name, part in (("train", train), ("val", val), ("test", test)):
        files[name] = f"{name}.json"
        with open(out_dir / files[name], "w", encoding="utf-8") as f:
            json.dump(part, f, ensure_ascii=False, indent=1, sort_keys=True)
            f.write("\n")
        write_jsonl(out_dir / f"openai_{name}.jsonl", (to_openai_chat(r) for r in part))
    write_json(out_dir / "dataset_info.json", dataset_info(p.dataset_name, files))
    write_jsonl(out_dir / "rejects.jsonl", rejects)

    metrics = {
        "records_in": len(kept) + len(rejects),
        "records_out": len(kept),
        "rejected": len(rejects),
        "rejects_by_field": dict(Counter(r["field"] for r in rejects)),
        "train": len(train),
        "val": len(val),
        "test": len(test),
        "generated_in_test": p.generated_in_test,
        "split_by_source": split_by_source({"train": train, "val": val, "test": test}),
        "with_system": sum(1 for r in kept if r["system"]),
        "with_history": sum(1 for r in kept if r["history"]),
    }
    write_json(Path(base.metrics_dir) / "build.json", metrics)
    print(
        f"build: {len(kept)} records -> train {len(train)}, val {len(val)}, test {len(test)}; {len(rejects)} "
        f"rejected"
    )


if __name__ == "__main__":
    run(main)
