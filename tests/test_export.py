"""Export: the merged model computes what base + adapter computes, and its card names the data."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.tuned_project import ROOT
from tuneline.common.records import chosen_model, read_json
from tuneline.model.export import dir_md5, merged_model
from tuneline.model.modeling import load_model, load_tokenizer

TEXTS = ["How long should a French press steep?", "法压壶大约浸泡四分钟。", "Grind finer, 25-30 seconds."]


def logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0] for t in TEXTS]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def base_plus_adapter(base_dir: Path, adapter_dir: Path):
    """The unmerged reference: the full-precision base with the adapter applied on the fly."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(str(base_dir)), adapter_dir).eval()


def train_params(method: str):
    from tuneline.common import params

    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return dataclasses.replace(params.section("train", data), method=method, compute_dtype="float32")


def test_exported_lora_model_gives_the_logits_of_base_plus_adapter(tuned_project, tiny_model_dir):
    export_dir = tuned_project / "models" / "export"
    tokenizer = load_tokenizer(str(export_dir))
    exported = logits(load_model(str(export_dir)).eval(), tokenizer)
    reference = logits(base_plus_adapter(tiny_model_dir, tuned_project / "models" / "adapter"), tokenizer)
    assert max_difference(exported, reference) < 1e-4
    # The adapter moved the model: a merge that dropped it would fail the check above.
    assert max_difference(logits(load_model(str(tiny_model_dir)).eval(), tokenizer), reference) > 1e-2


def test_export_writes_a_standalone_model_with_the_training_chat_template(tuned_project):
    export_dir = tuned_project / "models" / "export"
    names = {p.name for p in export_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= names
    assert "adapter_config.json" not in names and not any(n.endswith(".bin") for n in names)
    adapter_template = (tuned_project / "models" / "adapter" / "chat_template.jinja").read_text(
        encoding="utf-8"
    )
    assert (export_dir / "chat_template.jinja").read_text(encoding="utf-8") == adapter_template


def test_qlora_adapter_merges_into_the_dequantised_base(tiny_llama_dir, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    from tuneline.common.records import write_json
    from tuneline.model.training import keep_4bit_training_layout, prepare_model

    selected = chosen_model({"name": "tiny_llama", "kind": "local", "model": str(tiny_llama_dir)})
    model = prepare_model(selected, train_params("qlora"), seed=0)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    batch = tokenizer(TEXTS[0], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    for _ in range(
        3
    ):  # real QLoRA steps: LoRA B starts at zero, so an untrained adapter would merge trivially
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    write_json(adapter_dir / "training_args.json", {"method": "qlora"})  # as the train stage records it

    merged = merged_model(selected, adapter_dir, "float32").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # The reference is the model as trained: the 4-bit base with the adapter applied on the fly.
    four_bit = load_model(str(tiny_llama_dir), quantize_4bit=True, dtype="float32")
    keep_4bit_training_layout(four_bit)
    as_trained = PeftModel.from_pretrained(four_bit, adapter_dir).eval()
    assert max_difference(logits(merged, tokenizer), logits(as_trained, tokenizer)) < 1e-4
    # ... which the adapter merged into the unquantised base is not.
    assert (
        max_difference(
            logits(merged, tokenizer), logits(base_plus_adapter(tiny_llama_dir, adapter_dir), tokenizer)
        )
        > 1e-4
    )


def test_ptuning_adapter_is_refused_by_the_merge_with_the_way_out(tiny_model_dir, tmp_path):
    from tuneline.model.training import prepare_model

    selected = chosen_model({"name": "tiny_qwen", "kind": "local", "model": str(tiny_model_dir)})
    prepare_model(selected, train_params("ptuning"), seed=0).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="P-tuning adapter has no weights to merge; export it with `export"):
        merged_model(selected, tmp_path / "adapter", "float32")


def test_model_card_names_the_data_hashes_dvc_records(tuned_project, tmp_path):
    card = (tuned_project / "models" / "export" / "README.md").read_text(encoding="utf-8")
    alpaca = tuned_project / "data" / "alpaca"
    for name in ("train.json", "val.json", "test.json"):
        assert f"- `{name}`: `{hashlib.md5((alpaca / name).read_bytes()).hexdigest()}`" in card

    # The directory hash is the one DVC itself writes for the directory.
    shutil.copytree(alpaca, tmp_path / "alpaca")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "alpaca"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "alpaca.dvc").read_text())["outs"][0]["md5"]
    assert recorded.endswith(".dir") and dir_md5(alpaca) == recorded
    assert f"`data/alpaca` at `{recorded}`" in card

    result = read_json(tuned_project / "metrics" / "eval.json")
    for name in ("unseen", "seen"):
        assert f"## Evaluation: {name}" in card
        assert f"| loss | {result[name]['base']['loss']:.4f} | {result[name]['tuned']['loss']:.4f} |" in card
    assert (
        "fine-tuned with **lora**" in card
        and str(read_json(tuned_project / "models" / "selected.json")["model"]) in card
    )


PTUNING_QUESTION = "How long should a French press steep?"
PTUNING_ANSWER = "Four minutes."


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def ptuning_adapter(tiny_model_dir: Path, adapter_dir: Path) -> dict:
    """A P-tuning adapter whose prompt is trained (100 Adam steps) to make the base answer PTUNING_ANSWER.

    The tiny random base's logits hardly depend on its input (it answers newlines whatever the
    prompt), so its matrices are scaled by 10 first, into a base that virtual tokens can steer."""
    from tuneline.model.training import prepare_model

    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for weight in base.parameters():
            if weight.dim() == 2:
                weight.mul_(10)
    base_dir = adapter_dir.parent / "steerable_base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    selected = chosen_model({"name": "tiny_qwen", "kind": "local", "model": str(base_dir)})

    model = prepare_model(selected, train_params("ptuning"), seed=0)
    prompt = chat_ids(tokenizer, PTUNING_QUESTION)
    answer = tokenizer(PTUNING_ANSWER + "<|im_end|>", add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]
    ids, labels = torch.cat([prompt, answer], 1), torch.cat([torch.full_like(prompt, -100), answer], 1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return selected


def test_a_ptuning_export_is_a_plain_checkpoint_computing_base_plus_adapter(tiny_model_dir, tmp_path):
    """The export loads with plain transformers; through its chat template (virtual tokens first) its
    logits at the text's positions are peft's for base + adapter, and they differ from the base's."""
    from peft import PeftModel

    from tuneline.model.export import export

    selected = ptuning_adapter(tiny_model_dir, tmp_path / "adapter")
    assert export(selected, tmp_path / "adapter", tmp_path / "export", "float32") == "virtual tokens"
    assert not (tmp_path / "export" / "adapter_config.json").exists()

    exported = load_model(str(tmp_path / "export")).eval()
    exported_tokenizer = load_tokenizer(str(tmp_path / "export"))
    base = load_model(selected.name_or_path).eval()
    base_tokenizer = load_tokenizer(str(tiny_model_dir))
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    n_virtual = peft_model.peft_config["default"].num_virtual_tokens
    for text in TEXTS:
        plain, prefixed = chat_ids(base_tokenizer, text), chat_ids(exported_tokenizer, text)
        assert prefixed.shape[1] == plain.shape[1] + n_virtual and torch.equal(prefixed[:, n_virtual:], plain)
        with torch.no_grad():
            want = peft_model(input_ids=plain).logits[0, -plain.shape[1] :]
            got = exported(input_ids=prefixed).logits[0, n_virtual:, : want.shape[-1]]
            bare = base(input_ids=plain).logits[0]
        assert float((got - want).abs().max()) < 1e-4
        assert float((bare - want).abs().max()) > 1e-3  # the virtual tokens changed the answer's logits
    suppressed = set(exported.generation_config.suppress_tokens)
    assert suppressed == set(range(len(base_tokenizer), len(exported_tokenizer)))  # never generated


def test_tuneline_serve_serves_a_ptuning_export_as_base_plus_adapter(tiny_model_dir, tmp_path):
    """The served answer (stock `transformers serve` of the export) is peft's offline greedy answer with
    the virtual tokens, not the base's."""
    from peft import PeftModel

    from tests.test_oracles import plain_messages, served_answer
    from tuneline.model.export import export

    selected = ptuning_adapter(tiny_model_dir, tmp_path / "adapter")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    export(selected, tmp_path / "adapter", project / "models" / "export", "auto")

    record = {"instruction": PTUNING_QUESTION}
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt = tokenizer.apply_chat_template(
        plain_messages(record), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]

    def greedy(model) -> str:
        """Greedy decoding by the model's own forward over the whole sequence: the model as trained. (peft's
        cached `generate` places a P-tuning model's new tokens N positions early, so it is not the
        reference.)"""
        ids = prompt
        for _ in range(12):
            next_id = model(input_ids=ids).logits[0, -1].argmax().view(1, 1)
            if int(next_id) == tokenizer.convert_tokens_to_ids("<|im_end|>"):
                break
            ids = torch.cat([ids, next_id], 1)
        return tokenizer.decode(ids[0, prompt.shape[1] :], skip_special_tokens=True).strip()

    base = load_model(selected.name_or_path).eval()
    with torch.no_grad():
        base_answer = greedy(base)
        tuned_answer = greedy(PeftModel.from_pretrained(base, tmp_path / "adapter").eval())
    assert (
        tuned_answer == PTUNING_ANSWER != base_answer
    )  # the check below can tell the adapter from the bare base
    assert served_answer(project, record, max_tokens=24) == tuned_answer
