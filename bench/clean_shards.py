"""Which of clean's outputs move when 1% new records arrive, with the encoder taken out.

Runs `tuneline.data.clean.clean_records` on N synthetic rows of bench/scale.py and on the same plus 1% new
ones, embedding texts as hashed bags of words (sklearn's HashingVectorizer, 384 dimensions: cheap,
deterministic, near duplicates stay near), and prints how many keep/reject decisions of the old
records moved, how many reject rows changed (by reason), and how many kept shards the second run
writes anew (shards of --shard-records).

Run:  nice .venv/bin/python bench/clean_shards.py [--records 5000] [--shard-records 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # bench/dvc.py would shadow the dvc package

import numpy as np  # noqa: E402
from sklearn.feature_extraction.text import HashingVectorizer  # noqa: E402

from bench.scale import synthetic_lines  # noqa: E402
from tuneline.common import params  # noqa: E402
from tuneline.common.records import in_arrival_order, shard_files, with_ids, write_jsonl_shards  # noqa: E402
from tuneline.data.clean import clean_records  # noqa: E402


def rows(lines: list[str], tag: str) -> list[dict]:
    """The well-formed rows of `lines` as dataset records (bad rows are crawl's to reject)."""
    out = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row.get("output"), str) and row["output"]:
            out.append({**row, "source": "dataset", "row": f"{tag}:{i}"})
    return out


def decisions(result) -> dict[str, str]:
    found = {r["id"]: "kept" for r in result.kept}
    found.update({r["id"]: r["reason"] for r in result.rejects})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--shard-records", type=int, default=500)
    args = parser.parse_args()
    vectorizer = HashingVectorizer(n_features=384, alternate_sign=False, norm="l2")
    embed = lambda texts: vectorizer.transform(texts).toarray().astype(np.float32)  # noqa: E731
    p = params.section("clean", path=ROOT / "params.yaml")
    lines, _ = synthetic_lines(args.records, 0)
    new, _ = synthetic_lines(args.records // 100, 1)
    old = with_ids(rows(lines, "a"))
    grown = with_ids(rows(lines, "a") + rows([line.replace("#", "#new-") for line in new], "b"))
    first, second = clean_records(old, p, embed), clean_records(grown, p, embed)
    before, after = decisions(first), decisions(second)
    moved = Counter(f"{before[i]} -> {after[i]}" for i in before if before[i] != after[i])
    rejects = {(r["id"], r["reason"]): r for r in second.rejects}
    changed = Counter(r["reason"] for r in first.rejects if rejects.get((r["id"], r["reason"]), r) != r)
    with tempfile.TemporaryDirectory() as tmp:
        for name, result, records in (("first", first, old), ("second", second, grown)):
            write_jsonl_shards(
                Path(tmp) / name,
                in_arrival_order(result.kept, records),
                args.shard_records,
                lambda r: str(r["id"]),
            )
        held = {f.read_bytes() for f in shard_files(Path(tmp) / "first")}
        shards = [f.read_bytes() for f in shard_files(Path(tmp) / "second")]
    print(
        f"{len(before)} old records: {sum(moved.values())} decisions moved {dict(moved)}; "
        f"{sum(changed.values())} of {len(first.rejects)} reject rows changed {dict(changed)}; "
        f"{sum(1 for s in shards if s not in held)} of {len(shards)} kept shards new"
    )


if __name__ == "__main__":
    main()
