"""Record identity (tuneline/records.py) and the invariant it carries through the data stages:
every input appears exactly once, among the kept records or the rejects, at every stage."""

import json
from collections import Counter
from pathlib import Path

import numpy as np

from tuneline import augment, crawl, params
from tuneline.alpaca import split, validate
from tuneline.clean import clean_records
from tuneline.params import CrawlDataset
from tuneline.records import duplicate_ids, with_id, with_ids, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"instruction": "How long should a French press steep?", "output": "About four minutes, then press slowly."}


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
    seeds.write_text(json.dumps({**SHARED, "category": "brewing"}) + "\n"
                     + json.dumps({"instruction": "What is crema?", "output": "The foam on an espresso."}) + "\n")
    rows = tmp_path / "faq.jsonl"
    rows.write_text(json.dumps({"q": SHARED["instruction"], "a": SHARED["output"]}) + "\n"
                    + json.dumps({"q": "Why descale a kettle?", "a": "Limescale slows heating."}) + "\n"
                    + '{"q": "broken", "a": "line",}\n')

    # crawl: dataset rows in = records + rejects
    d = CrawlDataset(name="faq", path=str(rows), format="jsonl", split="train", columns={"instruction": "q", "output": "a"})
    ds_records, ds_rejects = crawl.load_datasets([d])
    assert len(ds_records) + len(ds_rejects) == 3
    assert [r["url"] for r in ds_rejects] == [f"{rows}:3"]
    write_jsonl(tmp_path / "datasets.jsonl", ds_records)

    # augment's pass-through: every input record keeps going, each with its own id
    records = augment.seed_records(seeds) + augment.dataset_records(tmp_path / "datasets.jsonl")
    assert len(records) == 4 and duplicate_ids(records) == []

    # clean: the seed is kept; the dataset row is rejected as a duplicate *of the seed's id*
    p = params.section("clean", path=ROOT / "params.yaml")
    result = clean_records(records, p, lambda texts: np.ones((len(texts), 4), dtype=np.float32))
    seed_twin = next(r for r in records if r["source"] == "seed" and r["instruction"] == SHARED["instruction"])
    row_twin = next(r for r in records if r["source"] == "dataset" and r["instruction"] == SHARED["instruction"])
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
    assert Counter(r["id"] for part in parts for r in part) + Counter(r["id"] for r in build_rejects) == Counter(kept_ids)


# --- the chosen model --------------------------------------------------------------------------------

API_CHOSEN = {"name": "hosted", "kind": "api", "model": "gpt-x", "base_url": "https://api.example.invalid/v1",
              "api_key_env": "OPENAI_API_KEY", "revision": None, "trust_remote_code": False, "metric": "rouge_l",
              "score": 0.5, "tied_with": [], "why": "highest validation rouge_l"}


def test_the_chosen_model_reads_what_loading_needs_and_keeps_the_file_s_mapping():
    from tuneline.records import read_chosen, read_json

    chosen = read_chosen(ROOT / "models" / "selected.json")
    record = read_json(ROOT / "models" / "selected.json")
    assert (chosen.name, chosen.name_or_path, chosen.revision, chosen.trust_remote_code, chosen.api) == (
        record["name"], record["model"], None, False, False)
    assert chosen.record == record
    from tuneline.records import chosen_model

    hub = chosen_model({"name": "q", "kind": "local", "model": "Qwen/Qwen2.5-0.5B", "revision": "abc123", "trust_remote_code": True})
    assert (hub.revision, hub.trust_remote_code, hub.api) == ("abc123", True, False)
    assert chosen_model({"name": "q", "kind": "local", "model": "m"}).revision is None  # older files name neither
    assert chosen_model(API_CHOSEN).api


def test_every_local_stage_skips_an_api_model_and_writes_its_declared_outputs(tmp_path, monkeypatch, capsys):
    import shutil

    import stages.evaluate
    import stages.export
    import stages.pretrain
    import stages.tokenize
    import stages.train
    from tuneline.records import read_json, read_jsonl, write_json

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "prompts", tmp_path / "prompts")  # the judge's, which evaluate checks are there
    monkeypatch.chdir(tmp_path)
    base = params.section("base")
    write_json(base.selected, API_CHOSEN)
    (Path(base.adapter_dir) / "stale").mkdir(parents=True)  # a local run's adapter, from before the API model won
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
    assert [read_json(f) for f in (metrics / "pretrain.json", metrics / "tokenize.json", metrics / "train" / "metrics.json",
                                   metrics / "eval.json")] == [{"skipped": 1}] * 4
    assert read_json(Path(base.pretrained_dir) / "SKIPPED.json") == {"reason": "hosted is an API model used as is"}
    assert read_json(Path(base.tokenized_dir) / "SKIPPED.json") == {
        "reason": "the chosen model hosted is an API model used as is: nothing to tokenize or train"}
    assert sorted(p.name for p in Path(base.adapter_dir).iterdir()) == ["SKIPPED.json"]
    assert read_json(Path(base.export_dir) / "SKIPPED.json") == {"reason": "hosted is an API model used as is; nothing to export"}
    assert (metrics / "eval_samples.md").read_text() == "Skipped: an API model was chosen; see select_table.md\n"
    assert [read_jsonl(metrics / "eval" / n) for n in ("records.jsonl", "seen_records.jsonl", "judge.jsonl")] == [[]] * 3
