"""bench/train.py's baselines do the work tuneline does: the same loss on the same rows, nothing more."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import torch
from datasets import Dataset

from tests.stage_project import ROOT, seed_records
from tuneline.common import params
from tuneline.common.records import chosen_model
from tuneline.model.modeling import load_tokenizer
from tuneline.model.tokenization import tokenize_example
from tuneline.model.training import peft_config, prepare_model, training_arguments


def bench_train():
    """bench/train.py as a module, loaded from its path; it puts the project root first on sys.path
    (for its own child processes), which is put back here."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_trl_baseline_trains_on_tuneline_s_rows_with_its_loss_and_no_per_step_metrics(
    tmp_path, tiny_model_dir
):
    from trl import SFTTrainer

    bench = bench_train()
    p = dataclasses.replace(params.section("train", path=ROOT / "params.yaml"), method="lora", batch_size=4)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    records = [r for r in seed_records() if r.get("history")][:2] + seed_records()[
        :2
    ]  # history turns are answers too
    rows = [tokenize_example(r, tokenizer, "auto", 512, "truncate", False) for r in records]  # none cut
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    args = training_arguments(p, tmp_path / "checkpoints", 42, has_eval=False)

    baseline = bench.trl_trainer(str(tiny_model_dir), p, args, ds, None, [])
    assert (
        baseline.args.learning_rate == args.learning_rate
        and baseline.args.neftune_noise_alpha == args.neftune_noise_alpha
    )
    batch = next(iter(baseline.get_train_dataloader()))
    # TRL kept tuneline's labels: every answer token, the history turns' too, and nothing else
    assert torch.equal(
        batch["labels"][batch["labels"] != -100].sort().values,
        torch.tensor([t for r in rows for t in r["labels"] if t != -100]).sort().values,
    )
    loss = baseline.compute_loss(baseline.model, dict(batch))
    assert not baseline._metrics["train"].get("entropy") and not baseline._metrics["train"].get(
        "mean_token_accuracy"
    )

    # TRL's own compute_loss gives the same loss, and computes the metrics the baseline leaves out
    plain = SFTTrainer(
        model=str(tiny_model_dir),
        args=bench.sft_config(args, max_length=None),
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=peft_config(p),
    )
    torch.testing.assert_close(plain.compute_loss(plain.model, dict(batch)), loss)
    assert plain._metrics["train"]["entropy"] and plain._metrics["train"]["mean_token_accuracy"]
    # and so does tuneline's training forward (LoRA starts as the identity: B is zero)
    ours = prepare_model(chosen_model({"name": "tiny", "kind": "local", "model": str(tiny_model_dir)}), p, 42)
    torch.testing.assert_close(ours(**batch).loss, loss)
