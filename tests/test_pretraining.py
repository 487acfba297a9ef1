"""Pretraining on raw text (the models stage, the optional pretrain stage) and decontamination."""

from __future__ import annotations

import json

import pytest
import torch

from tests.stage_project import make_project, run_stage, seed_records, set_params
from tuneline.eval.decontamination import contaminated
from tuneline.model.pretraining import heldout_loss, pretrain, run_params, split_blocks, text_blocks

ANSWER = (
    "Use water between 90 and 96 degrees, just off the boil, and pour slowly in circles so the bed "
    "of coffee stays evenly wet the whole time."
)


def test_text_blocks_keep_every_token_and_end_each_text():
    class Words:  # a tokenizer that makes one token per word
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    blocks = text_blocks(Words(), ["a bb ccc", "dddd ee"], block_size=3)
    assert blocks == [[1, 2, 3], [0, 4, 2], [0]]
    train, held = split_blocks([[i] for i in range(40)], heldout_fraction=0.05)
    assert held == [[19], [39]] and len(train) == 38


def test_decontamination_flags_a_shared_13_word_sequence_and_not_12():
    corpus = ["Some history first. " + ANSWER.upper() + " More text after it."]
    twelve = " ".join(ANSWER.split()[:12])
    assert contaminated([ANSWER, twelve, "Grind finer for espresso."], corpus, 13) == [0]
    assert contaminated([twelve], [twelve + " extra words here"], 12) == [0]


def test_pretraining_lowers_held_out_loss_through_the_trainer(tiny_model_dir, tmp_path):
    from tuneline.model.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), dtype="float32")
    texts = [r["output"] for r in seed_records()]
    train, held = split_blocks(text_blocks(tokenizer, texts, 32), 0.1)
    before = heldout_loss(model, held, tokenizer.pad_token_id, 8)
    weights = model.lm_head.weight.detach().clone()
    settings = run_params(learning_rate=3e-3, batch_size=8, max_steps=30, logging_steps=100)
    model, metrics = pretrain(model, tokenizer, train, settings, tmp_path / "checkpoints", 0, [])
    assert metrics["train_loss"] > 0
    assert not torch.equal(weights, model.lm_head.weight.detach())
    assert heldout_loss(model, held, tokenizer.pad_token_id, 8) < before - 0.5


@pytest.fixture
def crawl_project(tmp_path, tiny_model_dir):
    records = seed_records()
    project = make_project(tmp_path / "project", tiny_model_dir, records[:20], records[20:25])
    test = records[25:30] + [{**records[30], "id": "answer-in-a-doc", "output": ANSWER}]
    (project / "data/alpaca/test.json").write_text(json.dumps(test), encoding="utf-8")
    docs = [
        {
            "kind": "doc",
            "url": f"http://127.0.0.1/{i}",
            "title": "t",
            "text": " ".join(r["output"] for r in records[i : i + 6]),
        }
        for i in (0, 6, 12)
    ]  # training records only: val and test answers are records 20-30
    docs.append(
        {"kind": "doc", "url": "http://127.0.0.1/leak", "title": "t", "text": "A guide. " + ANSWER * 2}
    )
    docs.append({"kind": "doc", "url": "http://127.0.0.1/short", "title": "t", "text": "Too short."})
    docs.append({"kind": "qa", "url": "http://127.0.0.1/qa", "question": "q?", "answer": "a"})
    raw = project / "data/raw"
    raw.mkdir(parents=True)
    (raw / "crawl.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return project


def test_pretrain_stage_off_passes_the_selected_base_on_and_reports_contamination(crawl_project):
    run_stage(crawl_project, "pretrain")
    selected = json.loads((crawl_project / "models/selected.json").read_text())
    assert json.loads((crawl_project / "models/tuning_base.json").read_text()) == selected
    metrics = json.loads((crawl_project / "metrics/pretrain.json").read_text())
    assert (
        metrics["enabled"] is False and metrics["base_corpus"]["files"] == 0
    )  # a model with no recorded corpus
    assert (crawl_project / "models/pretrained/SKIPPED.json").exists()


def test_continued_pretraining_leaves_out_contaminated_documents_and_trains_the_base(
    crawl_project, tiny_model_dir
):
    from safetensors.torch import load_file

    set_params(
        crawl_project,
        "pretrain",
        enabled=True,
        epochs=3,
        batch_size=4,
        block_size=64,
        learning_rate=0.003,
        min_doc_chars=100,
    )
    run_stage(crawl_project, "pretrain")
    tuning = json.loads((crawl_project / "models/tuning_base.json").read_text())
    out = crawl_project / "models/pretrained"
    assert tuning["model"] == "models/pretrained" and tuning["continued_from"] == str(tiny_model_dir)
    rejects = {
        r["url"].rsplit("/", 1)[1]: r["reason"]
        for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())
    }
    assert rejects == {"leak": "contaminated", "short": "too_short"}
    metrics = json.loads((crawl_project / "metrics/pretrain.json").read_text())["continued"]
    assert metrics["documents"] == 3 and metrics["rejected"] == 2
    # the Trainer's runtime goes to the timings file, not into the DVCLive metrics DVC hashes
    assert json.loads((crawl_project / "metrics/timings/pretrain.json").read_text())["train_runtime"] > 0
    assert "runtime" not in (crawl_project / "metrics/pretrain/metrics.json").read_text()
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
