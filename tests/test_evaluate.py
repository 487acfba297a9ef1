"""The evaluate stage and the scoring it shares with select: base vs tuned on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.evaluate import compare, samples_table
from tuneline.common.records import read_json, read_jsonl, write_json
from tuneline.eval.scoring import generate, generate_ids, score, until_stop
from tuneline.model.generation import stop_ids

ROOT_PROMPTS = Path(__file__).resolve().parents[1] / "prompts"


def test_compare_reports_base_tuned_and_delta_of_the_metrics_both_have():
    base = {"loss": 2.0, "perplexity": 7.389, "rouge_l": 0.25, "records": 5, "generation_s": 3.0}
    tuned = {"loss": 1.5, "perplexity": 4.482, "rouge_l": 0.5, "records": 5, "generation_s": 1.0, "bleu": 0.2}
    intervals = {
        "loss": {"low": -0.7, "high": -0.3},
        "rouge_l": {"low": -0.1, "high": 0.6},
        "bleu": {"low": 0.1, "high": 0.3},
    }
    out = compare(base, tuned, intervals)
    assert out["delta"] == {"loss": -0.5, "perplexity": pytest.approx(-2.907), "rouge_l": 0.25}
    assert (
        set(out["base"]) == set(out["tuned"]) == {"loss", "perplexity", "rouge_l"}
    )  # no bleu: base has none
    assert out["delta_ci95"] == {"loss": intervals["loss"], "rouge_l": intervals["rouge_l"]}
    assert out["verdict"] == {"loss": "better", "rouge_l": "within noise"}
    assert out["records"] == 5


def test_samples_table_keeps_one_row_per_record_whatever_the_text():
    records = [
        {"instruction": "a | b\nc", "output": "x"},
        {"instruction": "two", "output": "y"},
        {"instruction": "3", "output": "z"},
    ]
    rows = [{"answer": "ans | 1"}, {"answer": "ans 2"}, {}]
    table = samples_table({"unseen": (records, rows, rows), "seen": (records[1:], rows[1:], rows[1:])}, n=2)
    unseen, seen = table.split("## seen")
    lines = unseen.strip().splitlines()
    assert lines[-2] == "| a \\| b c | x | ans \\| 1 | ans \\| 1 |"
    assert len([line for line in lines if line.startswith("| ")]) == 3  # header + 2 rows
    assert seen.splitlines()[-2:] == ["| two | y | ans 2 | ans 2 |", "| 3 | z |  |  |"]


def test_until_stop_keeps_what_was_generated_up_to_the_first_stop_token():
    assert until_stop([5, 6, 3, 0, 0], stops=[3]) == [5, 6, 3]  # a finished row padded in its batch
    assert until_stop([5, 6, 7], stops=[3]) == [5, 6, 7]
    assert until_stop([9, 4, 3], stops=[3, 4]) == [9, 4]


def test_stop_ids_join_the_tokenizer_eos_and_the_generation_config_ones(tiny_model_dir):
    from tuneline.model.modeling import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    assert stop_ids(model, tokenizer, "auto") == [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 1]
    assert stop_ids(model, tokenizer, "auto") == sorted({tokenizer.eos_token_id, 1})


def test_batched_generation_gives_the_answers_of_one_at_a_time(tiny_model_dir):
    from tests.conftest import SEEDS
    from tuneline.common.records import read_jsonl as read
    from tuneline.model.modeling import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    records = read(SEEDS)[:6]  # prompts of different lengths: the batch is left padded
    batched = generate_ids(model, tokenizer, records, "auto", batch_size=6, max_new_tokens=6)
    single = generate_ids(model, tokenizer, records, "auto", batch_size=1, max_new_tokens=6)
    assert batched == single
    assert all(0 < len(ids) <= 6 for ids in batched)
    assert tokenizer.padding_side == "right"  # restored after generating
    assert generate(model, tokenizer, records[:2], "auto", 2, 6) == [
        tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in batched[:2]
    ]


def test_tuned_loss_is_lower_than_base_loss_on_the_data_it_was_trained_on(tuned_project):
    evaluation = read_json(tuned_project / "metrics" / "eval.json")
    assert set(evaluation) == {"unseen", "seen"}
    assert evaluation["seen"]["records"] == 16  # evaluate.seen_samples of train.json
    result = evaluation["unseen"]
    assert result["records"] == 16
    assert set(result["base"]) == {
        "loss",
        "perplexity",
        "rouge_1",
        "rouge_2",
        "rouge_l",
        "bleu",
        "exact_match",
    }
    assert result["tuned"]["loss"] < result["base"]["loss"] - 0.1
    assert result["delta"]["loss"] == pytest.approx(
        result["tuned"]["loss"] - result["base"]["loss"], abs=1e-5
    )
    assert result["tuned"]["perplexity"] < result["base"]["perplexity"]
    # every delta has its paired interval, which holds the delta; trained on these records, loss is better
    assert set(result["delta_ci95"]) == set(result["delta"]) == set(result["verdict"])
    for key, delta in result["delta"].items():
        assert result["delta_ci95"][key]["low"] - 1e-6 <= delta <= result["delta_ci95"][key]["high"] + 1e-6, (
            key
        )
    assert result["verdict"]["loss"] == "better" and result["delta_ci95"]["loss"]["high"] < 0

    rows = read_jsonl(tuned_project / "metrics" / "eval" / "records.jsonl")
    assert [r["index"] for r in rows] == list(range(16))
    assert sum(r["tuned_loss"] < r["base_loss"] for r in rows) >= 12
    assert [("tuned_rouge_l" in r) for r in rows] == [True] * 4 + [False] * 12  # generation_samples: 4
    # both answers, for the review page's eval view
    assert [sorted(k for k in r if k.endswith("_answer")) for r in rows] == [
        ["base_answer", "tuned_answer"]
    ] * 4 + [[]] * 12
    assert all(isinstance(r["tuned_answer"], str) for r in rows[:4])

    samples = (tuned_project / "metrics" / "eval_samples.md").read_text(encoding="utf-8")
    first = read_json(tuned_project / "data" / "alpaca" / "test.json")[0]
    assert samples.count("\n| ") == 8  # per set (unseen, seen): header and samples_in_report: 3
    assert first["instruction"] in samples


def test_loss_counts_exactly_the_answer_tokens_training_learns_from(tuned_project, tiny_model_dir):
    from tuneline.model.modeling import load_model, load_tokenizer

    records = read_json(tuned_project / "data" / "alpaca" / "train.json")
    tokenizer = load_tokenizer(str(tuned_project / "models" / "adapter"))
    metrics, rows = score(
        load_model(str(tiny_model_dir)), tokenizer, records, "auto", 8, 4, generation_samples=0
    )
    trained_on = json.loads((tuned_project / "metrics" / "tokenize.json").read_text())["train"][
        "answer_tokens"
    ]
    assert metrics["answer_tokens"] == sum(r["answer_tokens"] for r in rows) == trained_on
    assert metrics["loss"] == pytest.approx(
        read_json(tuned_project / "metrics" / "eval.json")["seen"]["base"]["loss"], abs=1e-5
    )
    assert "rouge_l" not in metrics  # no generation asked for


def test_evaluate_skips_an_api_model_and_says_so(tmp_path, monkeypatch):
    import shutil

    import stages.evaluate
    from tests.tuned_project import ROOT

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "prompts", tmp_path / "prompts")  # the judge's prompt files, checked at start-up
    write_json(tmp_path / "models" / "tuning_base.json", {"name": "hosted", "kind": "api", "model": "gpt-x"})
    monkeypatch.chdir(tmp_path)
    stages.evaluate.main()
    assert read_json(tmp_path / "metrics" / "eval.json") == {"skipped": 1}
    for name in ("records.jsonl", "seen_records.jsonl", "judge.jsonl"):  # dvc.yaml's outs all exist
        assert read_jsonl(tmp_path / "metrics" / "eval" / name) == [], name
    assert (tmp_path / "cache" / "judge").is_dir()


def plain_answer_losses(model, tokenizer, records: list[dict]) -> list[tuple[float, int]]:
    """The reference: full fp32 logits of the whole batch, then cross-entropy on the answer tokens."""
    import torch

    from tuneline.model.tokenization import IGNORE, collate, encode

    batch = collate(
        [dict(zip(("input_ids", "labels"), encode(tokenizer, r, "auto", False))) for r in records],
        tokenizer.pad_token_id,
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].shape[1] :].float()  # P-tuning prepends its virtual tokens
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
    )
    mask = labels != IGNORE
    return [(float(loss[j][mask[j]].sum()), int(mask[j].sum())) for j in range(len(records))]


@pytest.mark.parametrize("kind", ["base", "lora", "ptuning"])
def test_chunked_answer_loss_equals_the_loss_of_the_full_logits(tiny_model_dir, kind):
    import torch
    from peft import LoraConfig, PromptEncoderConfig, get_peft_model

    from tests.conftest import SEEDS
    from tuneline.eval.scoring import answer_losses
    from tuneline.model.modeling import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    if kind == "lora":  # random B: an adapter that changes the output, as a trained one does
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    if kind == "ptuning":
        model = get_peft_model(model, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    records = read_jsonl(SEEDS)[:5]  # different lengths: the batch is padded
    expected = plain_answer_losses(model.eval(), tokenizer, records)
    for chunk in (7, 4096):  # several chunks per batch, and one
        got = answer_losses(model, tokenizer, records, "auto", batch_size=5, max_length=512, chunk=chunk)
        assert [n for _, n in got] == [n for _, n in expected] and all(n > 0 for _, n in got)
        for (loss, n), (ref, _) in zip(got, expected):
            assert loss / n == pytest.approx(ref / n, abs=1e-5)
    if kind != "base":  # the adapter took part: the base model alone scores otherwise
        base = plain_answer_losses(load_model(str(tiny_model_dir)).eval(), tokenizer, records)
        assert max(abs(a / n - b / n) for (a, n), (b, _) in zip(expected, base)) > 1e-3


def test_evaluate_with_the_judge_on_adds_its_rates_to_eval_json(tuned_project, tmp_path, monkeypatch):
    import shutil

    import yaml

    import stages.evaluate
    from tests.openai_stub import ScriptedServer

    project = tmp_path / "project"
    shutil.copytree(tuned_project, project)
    p = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    shutil.copytree(ROOT_PROMPTS, project / "prompts")
    with ScriptedServer(respond=lambda body: '{"winner": "B"}') as server:
        p["evaluate"]["judge"].update(
            enabled=True, base_url=server.base_url, model="judge", verdict="json", prompt="prompts/judge.txt"
        )
        (project / "params.yaml").write_text(yaml.safe_dump(p), encoding="utf-8")
        monkeypatch.chdir(project)
        stages.evaluate.main()
        assert server.requests == 2 * 4  # generation_samples: 4 records, both orders
    result = read_json(project / "metrics" / "eval.json")
    judged = result["unseen"]["judge"]
    assert judged["pairs"] == 4 and judged["tie"] == 1.0 and judged["position_consistency"] == 0.0
    assert "judge" not in result["seen"]
    assert [r["outcome"] for r in read_jsonl(project / "metrics" / "eval" / "judge.jsonl")] == ["tie"] * 4
    assert read_jsonl(tuned_project / "metrics" / "eval" / "judge.jsonl") == []  # judge off: nothing judged


@pytest.mark.parametrize("stage, section", [("evaluate", "evaluate"), ("select", "select")])
def test_a_dead_judge_endpoint_fails_the_stage_at_its_start_naming_the_key(tmp_path, stage, section):
    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        params[section]["judge"].update(enabled=True, base_url=dead, model="judge", verdict="json")
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for folder in ("prompts", "configs"):  # what the params name and check at load
            shutil.copytree(root / folder, tmp_path / folder)
        # No model and no data in this project: a stage that got past its preflight would fail on those
        # instead.
        write_json(
            tmp_path / params["base"]["tuning_base"],
            {"kind": "local", "name": "tiny_qwen", "model": "missing"},
        )
        args = [sys.executable, "-m", f"stages.{stage}"] + (["tiny_qwen"] if stage == "select" else [])
        result = subprocess.run(
            args,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
    assert result.returncode != 0
    assert (
        f"{section}.judge: {section}.judge.base_url '{dead}' did not answer GET /models" in result.stderr
    ), result.stderr
