"""Oracle tests: what only a model that learned can show.

They run on the default pipeline's own output (the `pipeline` fixture: one full `dvc repro` of the
embedded default, whose base models are pretrained and whose fine-tuned model memorised answers).
Each check is a function of the exported model's directory and the project's files, so it can also
be pointed at a broken copy. Four have a twin test that does so and expects the check to fail: an
export that lost its adapter, generation that attends to the left padding, a saved chat template
that drifted from training's, a tuned model that is the base. The serve test, whose server start is
the costly part, checks in the same test that the base would have answered otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneline.model.templates import end_of_turn

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ROUGE = rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(answer: str, reference: str) -> float:
    return ROUGE.score(reference, answer)["rougeL"].fmeasure


def plain_messages(record: dict) -> list[dict]:
    """The conversation as a user would send it, built without tuneline's code."""
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for user, assistant in record.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    content = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return messages + [{"role": "user", "content": content}]


def plain_generate(export_dir: Path, record: dict, max_new_tokens: int = 128) -> str:
    """Greedy answer of the exported model with plain transformers: no tuneline code."""
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        plain_messages(record), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def best_memorised(repo: Path) -> dict:
    """The seen (training) record the evaluate stage found best reproduced by the tuned model."""
    rows = [json.loads(line) for line in (repo / "metrics/eval/seen_records.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r.get("tuned_rouge_l", 0.0))
    train = json.loads((repo / "data/alpaca/train.json").read_text())
    return next(r for r in train if r["id"] == best["id"])


def check_reproduces_memorised_answer(export_dir: Path, record: dict) -> float:
    score = rouge_l(plain_generate(export_dir, record), record["output"])
    assert score >= 0.8, (
        f"the exported model answers {record['instruction']!r} with ROUGE-L {score:.2f} < 0.8"
    )
    return score


def test_exported_model_with_plain_transformers_reproduces_a_memorised_answer(pipeline):
    repo, _ = pipeline
    check_reproduces_memorised_answer(repo / "models/export", best_memorised(repo))


def selected_base(repo: Path) -> Path:
    """The base model the default fine-tuned: what an export that lost its adapter would hold."""
    return repo / json.loads((repo / "models/selected.json").read_text())["model"]


def test_memorised_answer_check_fails_on_an_export_that_lost_the_adapter(pipeline):
    repo, _ = pipeline
    with pytest.raises(AssertionError, match="ROUGE-L"):
        check_reproduces_memorised_answer(selected_base(repo), best_memorised(repo))


def broken_template(export_dir: Path, tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the exported model whose saved chat template renders `new` where it rendered `old`."""
    copy = tmp_path / "broken_export"
    shutil.copytree(export_dir, copy)
    template = copy / "chat_template.jinja"
    text = template.read_text()
    assert old in text, f"{old!r} is not in {template}"
    template.write_text(text.replace(old, new))
    return copy


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_answer(repo: Path, record: dict, max_tokens: int = 128, model: str = "models/export") -> str:
    """The answer of `tuneline serve` (a real `transformers serve` on 127.0.0.1) through the openai client,
    run in project `repo`, which serves base.export_dir (`model`, the request's model name)."""
    from openai import OpenAI

    from tuneline.interface.cli import stop, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with open(repo.parent / "serve.log", "w+b") as log:
        cli = subprocess.Popen(
            [sys.executable, "-m", "tuneline.interface.cli", "serve", "--port", str(port), "--device", "cpu"],
            cwd=repo,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_ready(url, timeout=240, process=cli)
            client = OpenAI(base_url=url, api_key="not-needed")
            reply = client.chat.completions.create(
                model=model, messages=plain_messages(record), max_tokens=max_tokens, temperature=0
            )
            return (reply.choices[0].message.content or "").strip()
        finally:
            stop(cli)


def test_serve_returns_the_greedy_answer_of_offline_generation(pipeline):
    repo, _ = pipeline
    record = best_memorised(repo)
    offline = plain_generate(repo / "models/export", record)
    served = served_answer(repo, record)
    assert served == offline
    # The comparison can tell models apart: a server that served the base (an export without its
    # adapter) would have answered otherwise.
    assert served != plain_generate(selected_base(repo), record)


def check_batched_equals_single(model_dir: Path, records: list[dict]) -> None:
    from tuneline.eval.scoring import generate_ids
    from tuneline.model.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype="float32")
    batched = generate_ids(model, tokenizer, records, "auto", batch_size=len(records), max_new_tokens=48)
    single = [
        generate_ids(model, tokenizer, [r], "auto", batch_size=1, max_new_tokens=48)[0] for r in records
    ]
    assert batched == single


def mixed_lengths(repo: Path, n: int = 6) -> list[dict]:
    """Records whose prompts differ in length the most: the batch needs real left padding."""
    records = (
        json.loads((repo / "data/alpaca/test.json").read_text())
        + json.loads((repo / "data/alpaca/train.json").read_text())[:16]
    )
    records.sort(key=lambda r: len(r["instruction"]) + len(r.get("input") or ""))
    picked = records[: n // 2] + records[-(n - n // 2) :]
    assert len({len(r["instruction"]) for r in picked}) > 1
    return picked


def test_batched_generation_of_the_trained_model_equals_one_at_a_time(pipeline):
    repo, _ = pipeline
    check_batched_equals_single(repo / "models/export", mixed_lengths(repo))


def test_batched_check_fails_when_padding_is_attended(pipeline, monkeypatch):
    """Generation that attends to the left padding (an attention mask of ones) must fail the check."""
    from transformers.generation.utils import GenerationMixin

    real = GenerationMixin.generate

    def attend_to_padding(self, *args, **kwargs):
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])
        return real(self, *args, **kwargs)

    repo, _ = pipeline
    records = mixed_lengths(repo)
    monkeypatch.setattr(GenerationMixin, "generate", attend_to_padding)
    with pytest.raises(AssertionError):
        check_batched_equals_single(repo / "models/export", records)


def check_serving_text_is_training_text(export_dir: Path, tokenized_dir: Path, records: list[dict]) -> None:
    """The prompt the served model is given (its saved chat template, add_generation_prompt) is the
    token-for-token prefix the model trained on, and the answer it learned starts right after it."""
    from datasets import load_from_disk

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    train = load_from_disk(str(tokenized_dir / "train"))
    assert len(train) == len(records)
    for record, example in zip(records, train):
        prompt = tokenizer.apply_chat_template(
            plain_messages(record), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(
            plain_messages(record) + [{"role": "assistant", "content": record["output"]}],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        ids, labels = list(example["input_ids"]), list(example["labels"])
        assert ids == full, f"record {record['id']}: served template renders other tokens than training saw"
        # The last answer (earlier ones are history turns, also learned) starts where the served prompt ends.
        start = len(prompt)
        assert ids[:start] == prompt, (
            f"record {record['id']}: the served prompt is not the text training saw before the answer"
        )
        learned = [i for i in range(start, len(labels)) if labels[i] != -100]
        assert labels[start - 1] == -100 and learned and learned == list(range(start, learned[-1] + 1)), (
            f"record {record['id']}: the answer training learned does not start where serving's prompt ends"
        )
        # it ends with the end-of-turn token, where serving stops; what the template writes after it is not
        # learned
        assert tokenizer.convert_ids_to_tokens(ids[learned[-1]]) == end_of_turn(tokenizer, "auto"), (
            f"record {record['id']}: the answer training learned does not end with the end-of-turn token"
        )


def test_the_text_the_model_sees_when_served_is_what_it_trained_on(pipeline):
    repo, _ = pipeline
    records = json.loads((repo / "data/alpaca/train.json").read_text())
    check_serving_text_is_training_text(repo / "models/export", repo / "data/tokenized", records)


def test_serving_text_check_fails_on_a_template_that_drifted(pipeline, tmp_path):
    """One extra newline after the assistant header in the saved template is a drift the check catches."""
    repo, _ = pipeline
    header = "<|im_start|>assistant\n"
    records = json.loads((repo / "data/alpaca/train.json").read_text())
    drifted = broken_template(
        repo / "models/export",
        tmp_path,
        f"{{% if add_generation_prompt %}}{header}",
        f"{{% if add_generation_prompt %}}{header}\n",
    )
    with pytest.raises(AssertionError, match="served prompt is not the text training saw"):
        check_serving_text_is_training_text(drifted, repo / "data/tokenized", records)


def check_tuned_beats_base_on_seen(eval_metrics: dict, train_metrics: dict) -> None:
    seen = eval_metrics["seen"]
    assert train_metrics["step"] > 0
    assert seen["tuned"]["rouge_l"] - seen["base"]["rouge_l"] >= 0.3, seen
    assert seen["tuned"]["loss"] < seen["base"]["loss"] - 1.0, seen


def test_tuned_beats_base_on_the_seen_set_by_a_margin(pipeline):
    repo, _ = pipeline
    check_tuned_beats_base_on_seen(
        json.loads((repo / "metrics/eval.json").read_text()),
        json.loads((repo / "metrics/train/metrics.json").read_text()),
    )


def test_seen_margin_check_fails_when_the_tuned_model_is_the_base(pipeline):
    """Scoring the base twice (a train stage that changed nothing) must fail the margin check."""
    repo, _ = pipeline
    eval_metrics = json.loads((repo / "metrics/eval.json").read_text())
    untrained = {**eval_metrics, "seen": {**eval_metrics["seen"], "tuned": eval_metrics["seen"]["base"]}}
    with pytest.raises(AssertionError):
        check_tuned_beats_base_on_seen(
            untrained, json.loads((repo / "metrics/train/metrics.json").read_text())
        )
