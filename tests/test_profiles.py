"""Training settings fit for the model: the tiny stand-ins keep theirs, any other base trains with
train.hub's."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest
import yaml

from tests.conftest import seed_texts
from tests.stage_project import ROOT, make_project, seed_records, stage_command, stage_env
from tuneline.common import params
from tuneline.model.profiles import local_parameters, profile_of, with_profile
from tuneline.model.zoo import save_standin


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return save_standin("qwen2.5-base", seed_texts(), tmp_path_factory.mktemp("standin"))


def default_train() -> params.Train:
    return params.section("train", params.read_params_file(ROOT / "params.yaml"))


def test_auto_keeps_a_stand_in_s_settings_and_gives_any_other_base_the_hub_ones(standin):
    p = default_train()
    assert 0 < local_parameters(str(standin)) < 10**6
    assert (
        profile_of(p, str(standin)) == "tiny" and with_profile(p, str(standin))[0] == p
    )  # the default's outputs stay
    tuned, profile, settings = with_profile(p, "Qwen/Qwen2.5-0.5B")  # a hub id: nothing local to count
    assert profile == "hub"
    assert settings == {
        "lora_r": 16,
        "lora_alpha": 32,
        "learning_rate": 2e-4,
        "epochs": 2,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.03,
        "neftune_noise_alpha": 0.0,
        "wise_ft": 1.0,
    }
    assert (tuned.lora_r, tuned.learning_rate, tuned.neftune_noise_alpha, tuned.wise_ft) == (
        16,
        2e-4,
        0.0,
        1.0,
    )
    full = dataclasses.replace(p, method="full")
    assert (
        with_profile(full, "Qwen/Qwen2.5-0.5B")[0].learning_rate == 2e-5
    )  # full fine-tuning moves every weight
    assert with_profile(dataclasses.replace(p, profile="tiny"), "Qwen/Qwen2.5-0.5B")[
        0
    ] == dataclasses.replace(p, profile="tiny")


def test_the_train_stage_says_and_records_which_settings_it_used(standin, tmp_path):
    records = seed_records()[:4]
    project = make_project(
        tmp_path,
        standin,
        records,
        records,
        train={"method": "lora", "profile": "hub", "max_steps": 1, "batch_size": 4},
        tokenize={"template": "auto", "packing": False},
    )
    for stage in ("tokenize", "train"):
        result = subprocess.run(
            stage_command(stage), cwd=project, env=stage_env(), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (
        "train: profile hub (train.profile hub): lora_r 16, lora_alpha 32, learning_rate 0.0002, epochs 2, "
        "lr_scheduler cosine, warmup_ratio 0.03, neftune_noise_alpha 0, wise_ft 1"
    ) in result.stdout
    args = json.loads((project / "models" / "adapter" / "training_args.json").read_text(encoding="utf-8"))
    assert (
        args["profile"] == "hub"
        and args["params"]["learning_rate"] == 2e-4
        and args["params"]["lr_scheduler"] == "cosine"
    )
    assert json.loads((project / "models" / "adapter" / "adapter_config.json").read_text())["r"] == 16
    logged = yaml.safe_load((project / "metrics" / "train" / "params.yaml").read_text(encoding="utf-8"))
    assert logged["profile"] == "hub" and logged["learning_rate"] == 2e-4
