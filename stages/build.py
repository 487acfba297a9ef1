"""Build the Alpaca training files from the cleaned records.

Reads:  base.clean_dir/records.jsonl
Writes: base.alpaca_dir/{train,val,test}.json (Alpaca: instruction, input, output, system, history),
        dataset_info.json (so the files load in LLaMA-Factory unchanged),
        openai_{train,val,test}.jsonl (OpenAI chat fine-tuning format),
        rejects.jsonl (file, line, field and reason of every record left out),
        base.metrics_dir/build.json
Run:    python -m stages.build
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from tuneline import params
from tuneline.alpaca import dataset_info, record_problems, split, to_alpaca, to_openai_chat
from tuneline.records import iter_jsonl, with_id, write_json, write_jsonl


def main() -> None:
    base, p = params.load("base", "build")
    source = Path(base.clean_dir) / "records.jsonl"
    out_dir = Path(base.alpaca_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)

    kept, rejects = [], []
    for line_no, record in enumerate(iter_jsonl(source), 1):
        problems = record_problems(record, p.max_tokens)
        if problems:
            for field, reason in problems:
                print(f"build: {source}:{line_no}: {field}: {reason}")
            rejects.append({
                "file": str(source), "line": line_no, "field": problems[0][0],
                "reason": "; ".join(f"{f}: {r}" for f, r in problems), "record": record,
            })
            continue
        kept.append(to_alpaca(with_id(record)))

    train, val, test = split(kept, p.val_fraction, p.test_fraction, base.seed)
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
        "with_system": sum(1 for r in kept if r["system"]),
        "with_history": sum(1 for r in kept if r["history"]),
    }
    write_json(Path(base.metrics_dir) / "build.json", metrics)
    print(f"build: {len(kept)} records -> train {len(train)}, val {len(val)}, test {len(test)}; {len(rejects)} rejected")


if __name__ == "__main__":
    main()
