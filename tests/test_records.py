"""Record identity (tuneline/common/records.py) and the invariant it carries through the data stages:
every input appears exactly once, among the kept records or the rejects, at every stage."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tuneline.common import params
from tuneline.common.params import CrawlDataset
from tuneline.common.records import (
    InputError,
    duplicate_ids,
    in_arrival_order,
    iter_numbered_jsonl_dir,
    read_jsonl_dir,
    shard_files,
    with_id,
    with_ids,
    write_jsonl,
    write_jsonl_shards,
)
from tuneline.data import augment, crawl
from tuneline.data.alpaca import split, validate
from tuneline.data.clean import clean_records

ROOT = Path(__file__).resolve().parents[1]
SHARED = {
    "instruction": "How long should a French press steep?",
    "output": "About four minutes, then press slowly.",
}


def test_same_text_from_two_sources_gets_two_ids_and_one_content_hash():
    seed = with_id({**SHARED, "source": "seed"})
    row = with_id({**SHARED, "source": "dataset", "origin": "dataset:faq"})
    assert seed["content_hash"] == row["content_hash"]
    assert seed["id"] != row["id"]


def test_identical_copies_in_one_input_are_numbered_and_others_do_not_move_them():
    a = with_ids([{**SHARED, "source": "seed"}, {**SHARED, "source": "seed"}])
    assert a[0]["id"] != a[1]["id"]
    b = with_ids([{"instruction": "Other?", "output": "Yes.", "source": "seed"}, *a])
    assert [r["id"] for r in b[1:]] == [r["id"] for r in a]


def test_seed_and_dataset_twin_one_kept_one_rejected_and_nothing_lost_at_any_stage(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        json.dumps({**SHARED, "category": "brewing"})
        + "\n"
        + json.dumps({"instruction": "What is crema?", "output": "The foam on an espresso."})
        + "\n"
    )
    rows = tmp_path / "faq.jsonl"
    rows.write_text(
        json.dumps({"q": SHARED["instruction"], "a": SHARED["output"]})
        + "\n"
        + json.dumps({"q": "Why descale a kettle?", "a": "Limescale slows heating."})
        + "\n"
        + '{"q": "broken", "a": "line",}\n'
    )

    # crawl: dataset rows in = records + rejects
    d = CrawlDataset(
        name="faq", path=str(rows), format="jsonl", split="train", columns={"instruction": "q", "output": "a"}
    )
    ds_records, ds_rejects = crawl.load_datasets([d])
    assert len(ds_records) + len(ds_rejects) == 3
    assert [r["url"] for r in ds_rejects] == [f"{rows}:3"]
    write_jsonl_shards(tmp_path / "datasets", ds_records, 2000, crawl.dataset_order)

    # augment's pass-through: every input record keeps going, each with its own id
    records = augment.seed_records(seeds) + augment.dataset_records(tmp_path / "datasets")
    assert len(records) == 4 and duplicate_ids(records) == []

    # clean: the seed is kept; the dataset row is rejected as a duplicate *of the seed's id*
    p = params.section("clean", path=ROOT / "params.yaml")
    result = clean_records(records, p, lambda texts: np.ones((len(texts), 4), dtype=np.float32))
    seed_twin = next(
        r for r in records if r["source"] == "seed" and r["instruction"] == SHARED["instruction"]
    )
    row_twin = next(
        r for r in records if r["source"] == "dataset" and r["instruction"] == SHARED["instruction"]
    )
    kept_ids = [r["id"] for r in result.kept]
    assert seed_twin["id"] in kept_ids and row_twin["id"] not in kept_ids
    reject = next(r for r in result.rejects if r["id"] == row_twin["id"])
    assert reject["reason"] == "exact_duplicate" and reject["duplicate_of"] == seed_twin["id"]
    assert Counter(kept_ids + [r["id"] for r in result.rejects]) == Counter(r["id"] for r in records)
    m = result.metrics
    assert m["records_in"] == m["records_out"] + m["rejected"] == 4

    # build: records in = split records + rejects, each id once
    kept, build_rejects = validate(list(enumerate(result.kept, 1)), "records.jsonl", max_tokens=1024)
    parts = split(kept, 0.15, 0.15, seed=42)
    assert Counter(r["id"] for part in parts for r in part) + Counter(
        r["id"] for r in build_rejects
    ) == Counter(kept_ids)


# --- the chosen model --------------------------------------------------------------------------------

API_CHOSEN = {
    "name": "hosted",
    "kind": "api",
    "model": "gpt-x",
    "base_url": "https://api.example.invalid/v1",
    "api_key_env": "OPENAI_API_KEY",
    "revision": None,
    "trust_remote_code": False,
    "metric": "rouge_l",
    "score": 0.5,
    "tied_with": [],
    "why": "highest validation rouge_l",
}


def test_the_chosen_model_reads_what_loading_needs_and_keeps_the_file_s_mapping():
    from tuneline.common.records import read_chosen, read_json

    chosen = read_chosen(ROOT / "models" / "selected.json")
    record = read_json(ROOT / "models" / "selected.json")
    assert (chosen.name, chosen.name_or_path, chosen.revision, chosen.trust_remote_code, chosen.api) == (
        record["name"],
        record["model"],
        None,
        False,
        False,
    )
    assert chosen.record == record
    from tuneline.common.records import chosen_model

    hub = chosen_model(
        {
            "name": "q",
            "kind": "local",
            "model": "Qwen/Qwen2.5-0.5B",
            "revision": "abc123",
            "trust_remote_code": True,
        }
    )
    assert (hub.revision, hub.trust_remote_code, hub.api) == ("abc123", True, False)
    assert (
        chosen_model({"name": "q", "kind": "local", "model": "m"}).revision is None
    )  # older files name neither
    assert chosen_model(API_CHOSEN).api


def test_every_local_stage_skips_an_api_model_and_writes_its_declared_outputs(tmp_path, monkeypatch, capsys):
    import shutil

    import stages.evaluate
    import stages.export
    import stages.pretrain
    import stages.tokenize
    import stages.train
    from tuneline.common.records import read_json, read_jsonl, write_json

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "prompts", tmp_path / "prompts")  # the judge's, which evaluate checks are there
    monkeypatch.chdir(tmp_path)
    base = params.section("base")
    write_json(base.selected, API_CHOSEN)
    (Path(base.adapter_dir) / "stale").mkdir(
        parents=True
    )  # a local run's adapter, from before the API model won
    for stage in (stages.pretrain, stages.tokenize, stages.train, stages.evaluate, stages.export):
        stage.main()
    assert capsys.readouterr().out.splitlines() == [
        "pretrain: skipped, an API model was chosen",
        "tokenize: skipped, the chosen model hosted is an API model used as is: nothing to tokenize or train",
        "train: skipped, the chosen model hosted is an API model used as is; no local training",
        "evaluate: skipped, the chosen model hosted is an API model used as is (see select_table.md)",
        "export: skipped, an API model was chosen",
    ]
    assert read_json(base.tuning_base) == API_CHOSEN
    metrics = Path(base.metrics_dir)
    assert [
        read_json(f)
        for f in (
            metrics / "pretrain.json",
            metrics / "tokenize.json",
            metrics / "train" / "metrics.json",
            metrics / "eval.json",
        )
    ] == [{"skipped": 1}] * 4
    assert read_json(Path(base.pretrained_dir) / "SKIPPED.json") == {
        "reason": "hosted is an API model used as is"
    }
    assert read_json(Path(base.tokenized_dir) / "SKIPPED.json") == {
        "reason": "the chosen model hosted is an API model used as is: nothing to tokenize or train"
    }
    assert sorted(p.name for p in Path(base.adapter_dir).iterdir()) == ["SKIPPED.json"]
    assert read_json(Path(base.export_dir) / "SKIPPED.json") == {
        "reason": "hosted is an API model used as is; nothing to export"
    }
    assert (
        metrics / "eval_samples.md"
    ).read_text() == "Skipped: an API model was chosen; see select_table.md\n"
    assert [
        read_jsonl(metrics / "eval" / n) for n in ("records.jsonl", "seen_records.jsonl", "judge.jsonl")
    ] == [[]] * 3


def synthetic(n: int, start: int = 0) -> list[dict]:
    return with_ids(
        {"instruction": f"Question {i}?", "output": f"Answer {i}.", "source": "dataset"}
        for i in range(start, start + n)
    )


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in shard_files(directory)}


def test_shards_concatenate_to_the_one_file_output_sorted_within_each_shard(tmp_path):
    records = synthetic(3000)
    by_id = lambda r: r["id"]  # noqa: E731
    assert write_jsonl_shards(tmp_path / "out", records, 200, by_id) == 3000
    files = shard_files(tmp_path / "out")
    assert 5 < len(files) < 40  # about 3000 / 200, cut where ids say
    read = read_jsonl_dir(tmp_path / "out")
    assert Counter(r["id"] for r in read) == Counter(r["id"] for r in records)
    # each shard is a run of the input in arrival order, sorted by id inside
    start = 0
    for path in files:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert [r["id"] for r in rows] == sorted(r["id"] for r in records[start : start + len(rows)])
        start += len(rows)
    # one shard (the default's hundred records) is the one-file output byte for byte
    write_jsonl_shards(tmp_path / "small", records[:100], 2000, by_id)
    write_jsonl(tmp_path / "small.jsonl", sorted(records[:100], key=by_id))
    assert [p.name for p in shard_files(tmp_path / "small")] == ["part-00000.jsonl"]
    assert (tmp_path / "small" / "part-00000.jsonl").read_bytes() == (tmp_path / "small.jsonl").read_bytes()


def test_appending_one_percent_and_inserting_a_few_rewrites_only_the_shards_they_land_in(tmp_path):
    records = synthetic(20_000)
    write_jsonl_shards(tmp_path / "before", records, 500, lambda r: r["id"])
    before = shard_bytes(tmp_path / "before")
    added = synthetic(200, start=20_000)  # 1% appended
    inserted = synthetic(3, start=50_000)
    rng = random.Random(0)
    grown = list(records)
    for record in inserted:  # three records in the middle, at unrelated places
        grown.insert(rng.randrange(1000, len(grown) - 1000), record)
    write_jsonl_shards(tmp_path / "after", grown + added, 500, lambda r: r["id"])
    after = shard_bytes(tmp_path / "after")
    unchanged = set(before.values()) & set(after.values())
    new = [name for name, blob in after.items() if blob not in unchanged]
    # DVC stores a directory by file content: only these shards are new to its cache
    assert len(before) > 25
    appended_ids = {r["id"] for r in added}
    holding_appended = [name for name, blob in after.items() if any(i.encode() in blob for i in appended_ids)]
    # an insertion rewrites its shard, or two when the inserted record ends a shard itself; the appended
    # rows rewrite the last shard and make their own
    assert len(new) <= 2 * len(inserted) + len(holding_appended) and len(holding_appended) <= 5
    assert sum(len(after[name]) for name in new) < 0.2 * sum(len(b) for b in after.values())
    # nothing lost, nothing twice, and the unchanged shards are the same bytes as before
    assert Counter(r["id"] for r in read_jsonl_dir(tmp_path / "after")) == Counter(
        r["id"] for r in grown + added
    )
    assert len(unchanged) >= len(before) - 4


def test_reading_shards_names_shard_and_line_and_old_one_file_output_is_named(tmp_path):
    write_jsonl_shards(tmp_path / "records", synthetic(50), 10)
    rows = list(iter_numbered_jsonl_dir(tmp_path / "records"))
    assert [(path.name, line) for path, line, _ in rows][:2] == [(rows[0][0].name, 1), (rows[0][0].name, 2)]
    first = shard_files(tmp_path / "records")[0]
    first.write_text(first.read_text(encoding="utf-8") + "{broken\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"{first}:\d+: not valid JSON"):
        read_jsonl_dir(tmp_path / "records")
    write_jsonl(tmp_path / "clean.jsonl", synthetic(2))
    with pytest.raises(InputError, match="clean.jsonl is an older version's one-file layout"):
        read_jsonl_dir(tmp_path / "clean")


def test_rows_follow_the_order_their_ids_arrived_in():
    arrived = synthetic(5)
    rows = [{"id": arrived[3]["id"], "reason": "a"}, {"id": "other"}, {"id": arrived[0]["id"], "reason": "b"}]
    assert [r["id"] for r in in_arrival_order(rows, arrived)] == [arrived[0]["id"], arrived[3]["id"], "other"]
