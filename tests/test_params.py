"""params.yaml validation: unknown, missing and mistyped keys fail naming the key and the fix."""

import copy
import dataclasses
import subprocess

import pytest
import yaml

from tuneline.common import params
from tuneline.common.params import ParamsError


@pytest.fixture(scope="module")
def raw() -> dict:
    return params.read_params_file("params.yaml")


def test_every_section_of_the_shipped_params_loads(raw):
    for name in params.SECTIONS:
        assert params.section(name, raw) is not None


def test_sections_are_frozen(raw):
    train = params.section("train", raw)
    with pytest.raises(Exception):
        train.lora_r = 99


def test_unknown_key_names_the_key(raw):
    data = copy.deepcopy(raw)
    data["train"]["lora_rr"] = 16
    with pytest.raises(ParamsError, match=r"train\.lora_rr is not a known key"):
        params.section("train", data)


def test_missing_key_names_the_key_and_the_fix(raw):
    data = copy.deepcopy(raw)
    del data["train"]["learning_rate"]
    with pytest.raises(ParamsError, match=r"train\.learning_rate is missing; add it to params.yaml"):
        params.section("train", data)


def test_wrong_type_names_the_key(raw):
    data = copy.deepcopy(raw)
    data["train"]["lora_r"] = "sixteen"
    with pytest.raises(ParamsError, match=r"train\.lora_r should be an integer, got 'sixteen'"):
        params.section("train", data)


def test_choice_lists_the_allowed_values(raw):
    data = copy.deepcopy(raw)
    data["train"]["method"] = "qlorra"
    with pytest.raises(ParamsError, match=r"train\.method 'qlorra' is not one of lora, qlora, ptuning, full"):
        params.section("train", data)


def test_bool_is_not_taken_for_a_number(raw):
    data = copy.deepcopy(raw)
    data["train"]["learning_rate"] = True
    with pytest.raises(ParamsError, match=r"train\.learning_rate should be a number"):
        params.section("train", data)


def test_int_is_accepted_where_a_float_is_declared(raw):
    data = copy.deepcopy(raw)
    data["train"]["learning_rate"] = 1
    assert params.section("train", data).learning_rate == 1.0


def test_nested_candidate_errors_name_the_candidate(raw):
    data = copy.deepcopy(raw)
    data["select"]["candidates"]["broken"] = {"kind": "local"}
    with pytest.raises(ParamsError, match=r"select\.candidates\.broken\.model is missing"):
        params.section("select", data)


def test_split_fractions_must_leave_training_data(raw):
    data = copy.deepcopy(raw)
    data["build"]["val_fraction"] = 0.6
    data["build"]["test_fraction"] = 0.5
    with pytest.raises(ParamsError, match=r"build\.val_fraction"):
        params.section("build", data)


def test_unknown_section_is_refused(tmp_path, raw):
    data = copy.deepcopy(raw)
    data["trian"] = {"lora_r": 4}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"section 'trian' is not known"):
        params.read_params_file(path)


def test_a_negative_neftune_alpha_names_the_key_and_what_it_should_be(raw):
    data = copy.deepcopy(raw)
    data["train"]["neftune_noise_alpha"] = -5
    with pytest.raises(
        ParamsError, match=r"train\.neftune_noise_alpha must be 0 \(off\) or a positive noise scale"
    ):
        params.section("train", data)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"wise_ft": 0}, r"train\.wise_ft must be in \(0, 1\]"),
        ({"wise_ft": 1.5}, r"train\.wise_ft must be in \(0, 1\]"),
        (
            {"method": "ptuning", "wise_ft": 0.85},
            r"P-tuning prompt has no base value .* set train\.wise_ft to 1\.0",
        ),
    ],
)
def test_a_wise_ft_share_it_cannot_apply_names_the_key_and_the_fix(raw, changes, message):
    data = copy.deepcopy(raw)
    data["train"].update(changes)
    with pytest.raises(ParamsError, match=message):
        params.section("train", data)
    data["train"]["wise_ft"] = 1.0
    assert params.section("train", data).wise_ft == 1.0


def test_the_whole_file_is_checked_and_every_unknown_key_is_named_with_the_key_meant(raw):
    data = copy.deepcopy(raw)
    data["evaluate"]["batch_sise"] = 4
    data["train"]["lora_rr"] = 16
    data["crawl"]["sources"][0]["max_pagez"] = 5
    data["select"]["candidates"]["tiny_qwen"]["modle"] = "x"
    data["trian"] = {}
    with pytest.raises(ParamsError) as err:
        params.check(data=data)
    message = str(err.value)
    assert message.startswith("params.yaml: 5 problems, nothing was run:")
    for line in (
        "section 'trian' is not known (did you mean 'train'?)",
        "evaluate.batch_sise is not a known key (did you mean evaluate.batch_size?)",
        "train.lora_rr is not a known key (did you mean train.lora_r?)",
        "crawl.sources[0].max_pagez is not a known key (did you mean crawl.sources[0].max_pages?)",
        "select.candidates.tiny_qwen.modle is not a known key (did you mean "
        "select.candidates.tiny_qwen.model?)",
    ):
        assert f"\n  {line}" in message


def test_the_whole_file_check_names_wrong_values_and_missing_sections_too(raw):
    data = copy.deepcopy(raw)
    data["train"]["wise_ft"] = 2
    data["build"]["max_tokens"] = "many"
    del data["export"]
    found = params.problems(data, complete=True)
    assert any(f.startswith("train.wise_ft must be in (0, 1]") for f in found)
    assert "build.max_tokens should be an integer, got 'many'" in found
    assert "the `export:` section is missing; add it (docs/params.md lists its keys)" in found
    assert params.problems(raw, complete=True) == []
    assert "the `export:` section is missing" not in " ".join(
        params.problems(data)
    )  # a stage that reads it says so


def test_a_key_far_from_any_known_one_lists_the_known_keys(raw):
    data = copy.deepcopy(raw)
    data["export"]["zzz"] = 1
    (found,) = params.problems(data)
    assert found.startswith("export.zzz is not a known key; known keys of export are: ")


def test_a_field_added_to_a_dataclass_is_known_without_another_edit(raw):
    """The check walks the dataclasses' own fields, so a key another change adds needs no list kept in
    step."""
    extended = dataclasses.make_dataclass(
        "ExportPlus",
        [("new_key", int, dataclasses.field(default=0))],
        bases=(params.SECTIONS["export"],),
        frozen=True,
    )
    assert params.unknown_keys(extended, {**raw["export"], "new_key": 3}, "export") == []
    assert params.unknown_keys(params.SECTIONS["export"], {**raw["export"], "new_key": 3}, "export") != []


def test_a_stage_stops_on_a_mistake_in_another_stage_s_section_before_its_work(tmp_path):
    from tests.stage_project import stage_command, stage_env

    data = params.read_params_file("params.yaml")
    data["evaluate"]["batch_sise"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        stage_command("feedback"), cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "evaluate.batch_sise is not a known key (did you mean evaluate.batch_size?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / data["base"]["feedback"]).exists()  # the feedback stage did none of its work


@pytest.mark.parametrize(
    "config, refused",
    [
        ("configs/accelerate/zero3.yaml", True),
        ("configs/accelerate/zero2.yaml", False),
        ("configs/accelerate/fsdp.yaml", False),
    ],
)
def test_wise_ft_of_full_fine_tuning_under_deepspeed_zero3_names_the_key_and_the_fix(raw, config, refused):
    data = copy.deepcopy(raw)
    data["train"].update(method="full", wise_ft=0.5, launcher="accelerate", accelerate_config=config)
    if refused:
        with pytest.raises(
            ParamsError, match=r"ZeRO-3: train\.wise_ft below 1 .* set train\.wise_ft to 1\.0"
        ):
            params.section("train", data)
    else:
        assert params.section("train", data).wise_ft == 0.5
    for changes in ({"wise_ft": 1.0}, {"method": "lora"}):  # as trained, or an adapter's B scaled: both fine
        assert params.section("train", {**data, "train": {**data["train"], **changes}}) is not None


def test_zero_stage_reads_an_accelerate_config_or_the_deepspeed_json_it_names(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 3}}')
    by_file = tmp_path / "by_file.yaml"
    by_file.write_text(
        yaml.safe_dump(
            {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": str(ds_json)}}
        )
    )
    assert params.zero_stage(str(by_file)) == 3
    assert params.zero_stage("configs/accelerate/zero2.yaml") == 2
    assert params.zero_stage("configs/accelerate/ddp.yaml") is None
    assert params.zero_stage(str(tmp_path / "missing.yaml")) is None


# --- rules that couple keys: each fails when params load, naming both keys and the fix ---------------


def load_problems(data: dict) -> str:
    """The message `params.load` stops with on `data` (what every stage checks first)."""
    with pytest.raises(ParamsError) as err:
        params.check(data=data)
    return str(err.value)


def test_ptuning_cannot_train_on_packed_data(raw):
    data = copy.deepcopy(raw)
    data["train"].update(method="ptuning", wise_ft=1.0)
    data["tokenize"]["packing"] = True
    assert (
        "\n  train.method 'ptuning' cannot train on packed data: set tokenize.packing to false"
        in load_problems(data)
    )
    data["tokenize"]["packing"] = False
    params.check(data=data)


def test_ptuning_cannot_take_the_hub_profile_s_wise_ft_either(raw):
    data = copy.deepcopy(raw)
    data["train"].update(method="ptuning", wise_ft=1.0, profile="hub")
    data["train"]["hub"]["wise_ft"] = 0.8
    assert "train.hub.wise_ft is 0.8, but a P-tuning prompt has no base value" in load_problems(data)
    data["train"]["profile"] = "tiny"  # the hub settings are not used
    params.check(data=data)


def test_a_ptuning_adapter_cannot_be_merged_for_evaluation(raw):
    data = copy.deepcopy(raw)
    data["train"].update(method="ptuning", wise_ft=1.0)
    data["evaluate"]["merge"] = True
    assert (
        "evaluate.merge is true, but a P-tuning adapter has no weights to merge; set evaluate.merge to false "
        "with train.method ptuning"
    ) in load_problems(data)
    data["train"]["method"] = "lora"
    params.check(data=data)


@pytest.mark.parametrize(
    "config, runs",
    [("fsdp.yaml", "FSDP"), ("zero2.yaml", "DEEPSPEED"), ("zero3.yaml", "DEEPSPEED"), ("ddp.yaml", None)],
)
def test_qlora_cannot_run_sharded_under_fsdp_or_deepspeed(raw, config, runs):
    data = copy.deepcopy(raw)
    data["train"].update(
        method="qlora", wise_ft=1.0, launcher="accelerate", accelerate_config=f"configs/accelerate/{config}"
    )
    if runs is None:
        assert params.section("train", data).method == "qlora"
        return
    with pytest.raises(
        ParamsError,
        match=rf"^train\.accelerate_config configs/accelerate/{config} runs {runs}: train\.method "
        r"'qlora' runs one whole 4-bit copy per GPU \(DDP\): set train\.accelerate_config "
        r"to configs/accelerate/ddp\.yaml, or train\.method to lora for FSDP/DeepSpeed$",
    ):
        params.section("train", data)
    data["train"]["launcher"] = "python"  # the config is not used
    assert params.section("train", data).method == "qlora"


def test_batch_calls_need_an_endpoint_with_the_batch_api(raw):
    data = copy.deepcopy(raw)
    data["augment"].update(batch=True, base_url="local")
    assert "augment.batch: true needs an endpoint with the OpenAI Batch API" in load_problems(data)
    data["augment"]["base_url"] = "https://api.openai.com/v1"
    params.check(data=data)


def test_every_unknown_key_of_a_section_is_named_at_once(raw):
    data = copy.deepcopy(raw)
    data["train"].update(lora_rr=16, epoch=3)
    with pytest.raises(ParamsError) as err:
        params.section("train", data)
    assert str(err.value) == (
        "train.epoch is not a known key (did you mean train.epochs?); "
        "train.lora_rr is not a known key (did you mean train.lora_r?)"
    )


def test_probes_of_the_machine_are_the_stage_s_not_the_loader_s(raw, tmp_path):
    data = copy.deepcopy(raw)
    data["evaluate"]["judge"].update(enabled=True, prompt=str(tmp_path / "missing.txt"))
    evaluate = params.section("evaluate", data)  # the file check passes: the prompt may not exist yet
    params.check(data=data)
    with pytest.raises(
        ParamsError, match=r"^evaluate\.judge\.prompt: .*missing\.txt is not a file; name a Jinja2 prompt"
    ):
        params.check_environment("evaluate", evaluate)
    data["train"].update(launcher="accelerate", accelerate_config=str(tmp_path / "none.yaml"))
    with pytest.raises(
        ParamsError, match=r"train\.accelerate_config '.*none\.yaml' is not a file; name one of configs/"
    ):
        params.check_environment("train", params.section("train", data))
    params.check_environment("train", params.section("train", raw))
