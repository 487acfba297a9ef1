"""A small project directory taken through tokenize → train → evaluate → export by the real stages.

The training split is also the test split, so the tuned model has seen exactly what it is scored
on and its answer loss must come out lower than the base model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECORDS = 16


def write_project(project: Path, base_model: Path) -> None:
    """params.yaml (the repository's, shrunk), the Alpaca splits and models/selected.json."""
    from tuneline.common.records import read_jsonl, write_json

    p = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    # The fixture's base is a random model, so what it answers after training is arbitrary; settings
    # that change it (NEFTune's noise included) are pinned, or a test of the serving path meets an
    # empty answer instead of the few tokens it expects.
    p["train"].update(
        method="lora",
        epochs=10,
        learning_rate=0.01,
        batch_size=8,
        grad_accum=1,
        save_steps=1000,
        logging_steps=5,
        lora_dropout=0.0,
        neftune_noise_alpha=0.0,
    )
    p["tokenize"].update(template="auto", max_length=256, packing=False)
    p["evaluate"].update(
        max_new_tokens=8, batch_size=8, generation_samples=4, merge=False, samples_in_report=3
    )
    p["evaluate"]["judge"]["enabled"] = (
        False  # the default's tiny judge needs a server start; the judge tests turn it on
    )
    p["export"].update(dtype="float32")
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    records = read_jsonl(ROOT / "data" / "seeds" / "seeds.jsonl")[:RECORDS]
    alpaca = project / p["base"]["alpaca_dir"]
    write_json(alpaca / "train.json", records)
    write_json(alpaca / "test.json", records)
    write_json(alpaca / "val.json", records[:4])
    (alpaca / "dataset_info.json").write_text(
        json.dumps({"tuneline_train": {"file_name": "train.json"}}), encoding="utf-8"
    )
    selected = {
        "name": "tiny_qwen",
        "kind": "local",
        "model": str(base_model),
        "revision": None,
        "trust_remote_code": False,
        "base_url": None,
        "api_key_env": None,
        "metric": "loss",
        "score": 0.0,
        "why": "the test fixture",
    }
    write_json(project / p["base"]["selected"], selected)
    write_json(
        project / p["base"]["tuning_base"], selected
    )  # what the pretrain stage hands on when it is off


def make_tuned_project(project: Path, base_model: Path) -> Path:
    """Run tokenize, train (LoRA), evaluate and export in `project`; return it."""
    import stages.evaluate
    import stages.export
    import stages.tokenize
    import stages.train

    write_project(project, base_model)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)  # stages read params.yaml and their relative paths from the working directory
        for stage in (stages.tokenize, stages.train, stages.evaluate, stages.export):
            stage.main()
    return project
