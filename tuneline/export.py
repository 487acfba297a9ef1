"""Export: the adapter merged into its base, saved as a standalone model with a model card."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tuneline.generation import greedy_config, stop_ids
from tuneline.modeling import load_tuned


def merged_model(selected: dict, adapter_dir: str | Path, dtype: str):
    """The base model at `dtype` (`auto`: see resolve_dtype) with the adapter merged in; full weights
    load at `dtype`. A QLoRA adapter merges into its base as it was trained: loaded in 4-bit, then
    dequantised (`dequantize()`) to `dtype`, so the merged model computes what the 4-bit base plus
    the adapter did, not the adapter on top of weights it never saw. It is `load_tuned`'s merge, the
    one evaluate scores with `evaluate.merge`."""
    if is_prompt_learning(adapter_dir):
        raise SystemExit("export: P-tuning adapters cannot be merged into weights; serve base + adapter instead")
    return load_tuned(selected, adapter_dir, merge=True, dtype=dtype)


def file_md5(path: str | Path) -> str:
    """The md5 DVC records for a file in dvc.lock."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def dir_md5(path: str | Path) -> str:
    """The `<md5>.dir` hash dvc.lock records for a directory, computed by DVC's own dvc-data."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    # The object database only receives the directory listing; an in-memory one leaves no trace.
    _, _, tree = build(HashFileDB(MemoryFileSystem(), "/odb"), str(path), LocalFileSystem(), "md5")
    return tree.hash_info.value


def model_card(selected: dict, training: dict, data_dir: str, data_dir_hash: str, data_hashes: dict[str, str],
               eval_metrics: dict) -> str:
    """README.md of the exported model: base, method, params, data version (the directory hash
    dvc.lock records for `data_dir`, and each file's md5) and eval metrics."""
    lines = [
        "---", f"library_name: {'peft' if training['method'] == 'ptuning' else 'transformers'}", f"base_model: {selected['model']}", "tags: [tuneline, " + training["method"] + "]", "---", "",
        f"# Fine-tuned {selected['name']}", "",
        f"Made by the tuneline pipeline: base model `{selected['model']}` (chosen by {selected['why']}),",
        f"fine-tuned with **{training['method']}**, " + ("exported as a P-tuning adapter: load it onto the base with "
        "peft (`PeftModel.from_pretrained`)." if training["method"] == "ptuning" else "merged and exported."), "",
        "## Training data", "",
        f"`{data_dir}` at `{data_dir_hash}` (the hash dvc.lock records for it); its files' md5:", "",
        *[f"- `{name}`: `{md5}`" for name, md5 in sorted(data_hashes.items())], "",
        "## Training parameters", "", "```json", json.dumps(training["params"], indent=2, sort_keys=True), "```", "",
        *[line for name, title in (("unseen", "test split"), ("seen", "training records")) if name in eval_metrics
          for line in (f"## Evaluation: {name} ({title})", "", "| metric | base | tuned | delta |", "|---|---|---|---|",
                       *[f"| {k} | {m['base'][k]:.4f} | {m['tuned'][k]:.4f} | {m['delta'][k]:+.4f} |"
                         for m in [eval_metrics[name]] for k in m["base"]], "")],
    ]
    return "\n".join(lines)


def is_prompt_learning(adapter_dir: str | Path) -> bool:
    """Whether `adapter_dir` holds a P-tuning adapter: virtual tokens, no weights to merge."""
    path = Path(adapter_dir) / "adapter_config.json"
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("peft_type") == "P_TUNING"


def export(selected: dict, adapter_dir: str | Path, out_dir: str | Path, dtype: str) -> str:
    """Write the servable model to `out_dir`; return what was written: "merged", or "adapter" for
    P-tuning, whose virtual tokens no plain checkpoint can hold: the adapter is copied as it is
    and loads onto the base with peft (`tuneline.modeling.load_tuned`)."""
    from tuneline.modeling import load_tokenizer

    out_dir = Path(out_dir)
    if is_prompt_learning(adapter_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(Path(adapter_dir) / name, out_dir / name)
        load_tokenizer(str(adapter_dir)).save_pretrained(out_dir)
        return "adapter"
    model = merged_model(selected, adapter_dir, dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = load_tokenizer(str(adapter_dir))
    tokenizer.save_pretrained(out_dir)
    # Greedy, stopping at the template's end of turn too: `tuneline serve` and a plain `generate` read
    # this file, and a base's own one neither stops there nor decodes greedily.
    greedy_config(stop_ids(model, tokenizer, "auto"), tokenizer.pad_token_id).save_pretrained(out_dir)
    return "merged"
