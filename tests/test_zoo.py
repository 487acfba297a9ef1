"""Every family stand-in (`tuneline.model.zoo`) through the real stages: tokenize -> train -> evaluate ->
export -> serve.

One project per family, trained once (module scope) on short answers it learns to end with its
template's end-of-turn token, then asserted on: the labels are exactly the answers plus that token;
the trained model stops there in evaluate's generation, under plain transformers with the exported
generation_config and (for the bases whose EOS is not the end of turn) in `tuneline serve`; the
served answer is the offline greedy one; evaluate's loss is the model's own forward loss.
Each family trains with one method (lora, qlora or full, together covering all three) to keep
the module's CPU time small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, seed_texts
from tests.tuned_project import write_project
from tuneline.model.zoo import FAMILIES, save_standin

METHODS = {
    "qwen2.5-base": "lora",
    "qwen2.5-instruct": "full",
    "qwen3": "lora",
    "llama3.2-base": "qlora",
    "llama3.2-instruct": "lora",
    "gemma2": "full",
    "phi3": "qlora",
}
SERVED = {
    "qwen2.5-base",
    "llama3.2-base",
}  # bases whose EOS is not their end of turn: serving once per family costs ~20 s
# Templates that rewrite earlier turns once a later one exists: only the last answer is learnt.
LAST_TURN_ONLY = {"qwen3", "phi3"}
ANSWER_PREFIX = {
    "qwen3": "<think>\n\n</think>\n\n"
}  # Qwen3's template writes an empty reasoning block before the answer
MAX_NEW = 24

# Short answers a tiny model learns in a few dozen steps; no system prompt (Gemma 2's template refuses one).
RECORDS = [
    {"instruction": q, "input": "", "output": a, "system": "", "history": h}
    for q, a, h in [
        ("What grind suits a French press?", "Coarse.", []),
        ("How long does espresso extract?", "About 28 s.", []),
        ("Which water is best for coffee?", "Filtered.", []),
        ("Does a dark roast have more caffeine?", "Slightly less.", [["Is coffee a fruit?", "A seed."]]),
    ]
]


def project_for(family: str, project: Path) -> Path:
    """A project whose base is the family's stand-in, params set to learn RECORDS by heart."""
    from tuneline.common.records import write_json

    base = save_standin(family, seed_texts(), project / "standin")
    write_project(project, base)
    p = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    method = METHODS[family]
    p["train"].update(
        method=method,
        epochs=40,
        learning_rate=0.004 if method == "full" else 0.02,
        batch_size=4,
        lora_r=16,
        lora_alpha=32,
        wise_ft=1.0,
        compute_dtype="float32",
    )
    p["evaluate"].update(
        max_new_tokens=MAX_NEW, batch_size=4, generation_samples=4, merge=method == "qlora", dtype="float32"
    )
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    for split in ("train", "test", "val"):
        write_json(project / p["base"]["alpaca_dir"] / f"{split}.json", RECORDS)
    return project


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory):
    """(family, project) after the real tokenize, train, evaluate and export stages ran in it."""
    import stages.evaluate
    import stages.export
    import stages.tokenize
    import stages.train

    family = request.param
    project = project_for(family, tmp_path_factory.mktemp(family))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        for stage in (stages.tokenize, stages.train, stages.evaluate, stages.export):
            stage.main()
    return family, project


def selected(project: Path):
    from tuneline.common.records import read_chosen

    return read_chosen(project / "models" / "selected.json")


def test_labels_cover_exactly_the_answers_and_their_end_of_turn(trained):
    from tuneline.model.modeling import load_tokenizer
    from tuneline.model.tokenization import IGNORE, encode

    family, project = trained
    tokenizer = load_tokenizer(str(project / "models" / "adapter"))
    turn_end = FAMILIES[family].end_of_turn
    for record in RECORDS:
        ids, labels = encode(tokenizer, record, "auto", train_on_prompt=False)
        spans, current = [], []
        for token, label in zip(ids, labels):
            if label != IGNORE:
                current.append(token)
            elif current:
                spans, current = [*spans, current], []
        spans += [current] if current else []
        answers = [a for _, a in record["history"]] if family not in LAST_TURN_ONLY else []
        expected = [a + turn_end for a in answers] + [
            ANSWER_PREFIX.get(family, "") + record["output"] + turn_end
        ]
        assert [tokenizer.decode(s) for s in spans] == expected


def test_evaluate_generation_stops_at_the_end_of_turn_with_the_learnt_answer(trained):
    from tuneline.common.records import read_jsonl
    from tuneline.eval.scoring import generate_ids
    from tuneline.model.modeling import load_tokenizer, load_tuned

    family, project = trained
    tokenizer = load_tokenizer(str(project / "models" / "adapter"))
    turn_end = tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    model = load_tuned(
        selected(project), project / "models" / "adapter", merge=METHODS[family] == "qlora", dtype="float32"
    )
    answers = generate_ids(model, tokenizer, RECORDS, "auto", batch_size=4, max_new_tokens=MAX_NEW)
    assert [ids[-1] for ids in answers] == [turn_end] * len(RECORDS)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]
    assert texts == [(ANSWER_PREFIX.get(family, "") + r["output"]).strip() for r in RECORDS]
    # the evaluate stage generated the same answers
    rows = read_jsonl(project / "metrics" / "eval" / "records.jsonl")
    assert [row["tuned_answer"] for row in rows] == texts


def test_plain_transformers_with_the_exported_generation_config_stops_and_decodes_greedily(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline.data.alpaca import to_messages

    family, project = trained
    export_dir = project / "models" / "export"
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    config = model.generation_config
    assert config.do_sample is False and config.repetition_penalty in (None, 1.0)
    turn_end = tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    for record in RECORDS:
        inputs = tokenizer.apply_chat_template(
            to_messages(record, with_answer=False),
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(**inputs, max_new_tokens=MAX_NEW)[0, inputs["input_ids"].shape[1] :].tolist()
        assert out[-1] == turn_end and len(out) < MAX_NEW
        assert tokenizer.decode(out, skip_special_tokens=True).strip().endswith(record["output"])


def test_evaluate_loss_is_the_model_s_own_forward_loss(trained):
    from tuneline.eval.scoring import answer_losses
    from tuneline.model.modeling import load_tokenizer, load_tuned
    from tuneline.model.tokenization import encode

    family, project = trained
    tokenizer = load_tokenizer(str(project / "models" / "adapter"))
    model = load_tuned(selected(project), project / "models" / "adapter", dtype="float32").eval()
    ours = answer_losses(model, tokenizer, RECORDS, "auto", batch_size=4, max_length=512)
    for record, (total, count) in zip(RECORDS, ours):
        ids, labels = encode(tokenizer, record, "auto", train_on_prompt=False)
        with torch.no_grad():
            own = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        assert total / count == pytest.approx(float(own), rel=1e-4, abs=1e-5)


def test_served_answer_is_the_offline_greedy_one_and_stops(trained, tmp_path):
    from openai import OpenAI

    from tuneline.eval.scoring import generate
    from tuneline.interface.cli import stop, wait_ready
    from tuneline.llm.server import free_port
    from tuneline.model.modeling import load_model, load_tokenizer

    family, project = trained
    if family not in SERVED:
        pytest.skip("served for the bases whose EOS is not their end of turn only")
    export_dir = project / "models" / "export"
    tokenizer, model = load_tokenizer(str(export_dir)), load_model(str(export_dir), dtype="float32")
    offline = generate(model, tokenizer, RECORDS, "auto", batch_size=4, max_new_tokens=MAX_NEW)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with open(tmp_path / "serve.log", "w+b") as log:
        cli = subprocess.Popen(
            [sys.executable, "-m", "tuneline.interface.cli", "serve", "--port", str(port), "--device", "cpu"],
            cwd=project,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_ready(url, timeout=180, process=cli)
            client = OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=120)
            from tuneline.data.alpaca import to_messages

            # no temperature in the request: the exported generation config alone must make it greedy and
            # stop it
            replies = [
                client.chat.completions.create(
                    model="models/export", messages=to_messages(r, with_answer=False), max_tokens=MAX_NEW
                ).choices[0]
                for r in RECORDS
            ]
        finally:
            stop(cli)
    assert [c.message.content.strip() for c in replies] == offline
    assert [c.finish_reason for c in replies] == ["stop"] * len(RECORDS)


def test_evaluate_with_merge_scores_the_weights_export_writes(trained):
    from tuneline.model.modeling import load_model, load_tokenizer, load_tuned

    family, project = trained
    if METHODS[family] != "qlora":
        pytest.skip(
            "the QLoRA families: merging into the dequantised 4-bit base is where scoring and export could "
            "part"
        )
    export_dir = project / "models" / "export"
    tokenizer = load_tokenizer(str(export_dir))
    batch = tokenizer(["How fine for a French press?", "法压壶"], return_tensors="pt", padding=True)
    scored = load_tuned(selected(project), project / "models" / "adapter", merge=True, dtype="float32").eval()
    exported = load_model(str(export_dir), dtype="float32").eval()
    with torch.no_grad():
        difference = (scored(**batch).logits - exported(**batch).logits).abs().max()
    assert float(difference) < 1e-5


def test_generation_is_greedy_whatever_the_hub_generation_config_sets(tmp_path):
    from tuneline.data.alpaca import to_messages
    from tuneline.eval.scoring import generate_ids
    from tuneline.model.generation import stop_ids
    from tuneline.model.modeling import load_model, load_tokenizer
    from tuneline.model.templates import render

    base = save_standin(
        "qwen2.5-instruct", seed_texts(), tmp_path / "standin"
    )  # its config samples at temperature 0.7
    tokenizer, model = load_tokenizer(str(base)), load_model(str(base), dtype="float32").eval()
    model.generation_config.update(
        repetition_penalty=5.0, no_repeat_ngram_size=2
    )  # a random model repeats itself
    hub_config = model.generation_config.to_dict()
    answers = generate_ids(model, tokenizer, RECORDS, "auto", batch_size=1, max_new_tokens=12)
    stops = stop_ids(model, tokenizer, "auto")
    for record, answer in zip(RECORDS, answers):
        ids = tokenizer(
            render(tokenizer, to_messages(record, with_answer=False), "auto", add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        greedy = []
        with torch.no_grad():
            while len(greedy) < 12 and not (greedy and greedy[-1] in stops):
                greedy.append(int(model(input_ids=torch.tensor([ids + greedy])).logits[0, -1].argmax()))
        assert answer == greedy
    assert model.generation_config.to_dict() == hub_config  # the model's own config is back as it was
