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
from tuneline.export import dir_md5, merged_model
from tuneline.modeling import load_model, load_tokenizer
from tuneline.records import read_json

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
    from tuneline import params

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
    adapter_template = (tuned_project / "models" / "adapter" / "chat_template.jinja").read_text(encoding="utf-8")
    assert (export_dir / "chat_template.jinja").read_text(encoding="utf-8") == adapter_template


def test_qlora_adapter_merges_into_the_dequantised_base(tiny_llama_dir, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    from tuneline.records import write_json
    from tuneline.training import keep_4bit_training_layout, prepare_model

    selected = {"name": "tiny_llama", "kind": "local", "model": str(tiny_llama_dir)}
    model = prepare_model(selected, train_params("qlora"), seed=0)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    batch = tokenizer(TEXTS[0], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    for _ in range(3):  # real QLoRA steps: LoRA B starts at zero, so an untrained adapter would merge trivially
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
    assert max_difference(logits(merged, tokenizer), logits(base_plus_adapter(tiny_llama_dir, adapter_dir), tokenizer)) > 1e-4


def test_ptuning_adapter_is_refused_with_the_way_out(tiny_model_dir, tmp_path):
    from tuneline.training import prepare_model

    selected = {"name": "tiny_qwen", "kind": "local", "model": str(tiny_model_dir)}
    prepare_model(selected, train_params("ptuning"), seed=0).save_pretrained(tmp_path / "adapter")
    with pytest.raises(SystemExit, match="P-tuning adapters cannot be merged"):
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
    assert "fine-tuned with **lora**" in card and str(read_json(tuned_project / "models" / "selected.json")["model"]) in card


def test_a_ptuning_run_exports_its_adapter_which_loads_back(tiny_model_dir, tmp_path):
    from tuneline.export import export
    from tuneline.modeling import load_tuned
    from tuneline.training import prepare_model

    selected = {"name": "tiny_qwen", "kind": "local", "model": str(tiny_model_dir)}
    adapter_dir = tmp_path / "adapter"
    prepare_model(selected, train_params("ptuning"), seed=0).save_pretrained(adapter_dir)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(adapter_dir)
    assert export(selected, adapter_dir, tmp_path / "export", "auto") == "adapter"

    tokenizer = load_tokenizer(str(tmp_path / "export"))
    exported = logits(load_tuned(selected, tmp_path / "export").eval(), tokenizer)
    assert max_difference(exported, logits(load_tuned(selected, adapter_dir).eval(), tokenizer)) == 0
    base = logits(load_model(str(tiny_model_dir)).eval(), tokenizer)
    # the text's positions come after the virtual tokens, and the virtual tokens changed them
    assert max_difference([e[-len(b):] for e, b in zip(exported, base)], base) > 1e-3


def test_tuneline_serve_serves_a_ptuning_export_as_base_plus_adapter(tiny_model_dir, tmp_path):
    """The served answer is peft's offline greedy answer with the virtual tokens, not the base's."""
    from peft import PeftModel

    from tests.test_oracles import plain_messages, served_answer
    from tuneline.export import export
    from tuneline.training import prepare_model

    selected = {"name": "tiny_qwen", "kind": "local", "model": str(tiny_model_dir)}
    prepare_model(selected, train_params("ptuning"), seed=0).save_pretrained(tmp_path / "adapter")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "adapter")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    export(selected, tmp_path / "adapter", project / "models" / "export", "auto")

    record = {"instruction": "How long should a French press steep?"}
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt = tokenizer.apply_chat_template(plain_messages(record), add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)

    def greedy(model) -> str:
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    base = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        base_answer = greedy(base)
        tuned_answer = greedy(PeftModel.from_pretrained(base, project / "models" / "export").eval())
    assert tuned_answer != base_answer  # the check below can tell the adapter from the bare base
    assert served_answer(project, record, max_tokens=24) == tuned_answer
