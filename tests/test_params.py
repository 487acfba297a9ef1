"""params.yaml validation: unknown, missing and mistyped keys fail naming the key and the fix."""

import copy

import pytest
import yaml

from tuneline import params
from tuneline.params import ParamsError


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
    with pytest.raises(ParamsError, match=r"train\.neftune_noise_alpha must be 0 \(off\) or a positive noise scale"):
        params.section("train", data)


@pytest.mark.parametrize("changes, message", [
    ({"wise_ft": 0}, r"train\.wise_ft must be in \(0, 1\]"),
    ({"wise_ft": 1.5}, r"train\.wise_ft must be in \(0, 1\]"),
    ({"method": "ptuning", "wise_ft": 0.85}, r"P-tuning prompt has no base value .* set train\.wise_ft to 1\.0"),
])
def test_a_wise_ft_share_it_cannot_apply_names_the_key_and_the_fix(raw, changes, message):
    data = copy.deepcopy(raw)
    data["train"].update(changes)
    with pytest.raises(ParamsError, match=message):
        params.section("train", data)
    data["train"]["wise_ft"] = 1.0
    assert params.section("train", data).wise_ft == 1.0


@pytest.mark.parametrize("config, refused", [
    ("configs/accelerate/zero3.yaml", True), ("configs/accelerate/zero2.yaml", False), ("configs/accelerate/fsdp.yaml", False),
])
def test_wise_ft_of_full_fine_tuning_under_deepspeed_zero3_names_the_key_and_the_fix(raw, config, refused):
    data = copy.deepcopy(raw)
    data["train"].update(method="full", wise_ft=0.5, launcher="accelerate", accelerate_config=config)
    if refused:
        with pytest.raises(ParamsError, match=r"ZeRO-3: train\.wise_ft below 1 .* set train\.wise_ft to 1\.0"):
            params.section("train", data)
    else:
        assert params.section("train", data).wise_ft == 0.5
    for changes in ({"wise_ft": 1.0}, {"method": "lora"}):  # as trained, or an adapter's B scaled: both fine
        assert params.section("train", {**data, "train": {**data["train"], **changes}}) is not None


def test_zero_stage_reads_an_accelerate_config_or_the_deepspeed_json_it_names(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 3}}')
    by_file = tmp_path / "by_file.yaml"
    by_file.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED",
                                       "deepspeed_config": {"deepspeed_config_file": str(ds_json)}}))
    assert params.zero_stage(str(by_file)) == 3
    assert params.zero_stage("configs/accelerate/zero2.yaml") == 2
    assert params.zero_stage("configs/accelerate/ddp.yaml") is None
    assert params.zero_stage(str(tmp_path / "missing.yaml")) is None
