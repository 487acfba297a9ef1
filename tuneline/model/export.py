"""Export: the adapter merged into its base (a P-tuning prompt written into the vocabulary), saved as a
standalone model with a greedy generation config and a model card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tuneline.common.records import ChosenModel
from tuneline.model.generation import greedy_config, stop_ids
from tuneline.model.modeling import load_tuned


def merged_model(chosen: ChosenModel, adapter_dir: str | Path, dtype: str):
    """The base model at `dtype` (`auto`: see resolve_dtype) with the adapter merged in; full weights
    load at `dtype`. A QLoRA adapter merges into its base as it was trained: loaded in 4-bit, then
    dequantised (`dequantize()`) to `dtype`, so the merged model computes what the 4-bit base plus
    the adapter did, not the adapter on top of weights it never saw. It is `load_tuned`'s merge, the
    one evaluate scores with `evaluate.merge`."""
    if is_prompt_learning(adapter_dir):
        raise ValueError(
            "export: a P-tuning adapter has no weights to merge; export it with `export()`, which "
            "writes its virtual tokens into the vocabulary"
        )
    return load_tuned(chosen, adapter_dir, merge=True, dtype=dtype)


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


def model_card(
    chosen: ChosenModel,
    training: dict,
    data_dir: str,
    data_dir_hash: str,
    data_hashes: dict[str, str],
    eval_metrics: dict,
) -> str:
    """README.md of the exported model: base, method, params, data version (the directory hash
    dvc.lock records for `data_dir`, and each file's md5) and eval metrics."""
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {chosen.name_or_path}",
        "tags: [tuneline, " + training["method"] + "]",
        "---",
        "",
        f"# Fine-tuned {chosen.name}",
        "",
        f"Made by the tuneline pipeline: base model `{chosen.name_or_path}` (chosen by "
        f"{chosen.record['why']}),",
        f"fine-tuned with **{training['method']}**, "
        + (
            "exported with its virtual tokens as special tokens that the chat template puts first."
            if training["method"] == "ptuning"
            else "merged and exported."
        ),
        "",
        "## Training data",
        "",
        f"`{data_dir}` at `{data_dir_hash}` (the hash dvc.lock records for it); its files' md5:",
        "",
        *[f"- `{name}`: `{md5}`" for name, md5 in sorted(data_hashes.items())],
        "",
        "## Training parameters",
        "",
        "```json",
        json.dumps(training["params"], indent=2, sort_keys=True),
        "```",
        "",
        *[
            line
            for name, title in (("unseen", "test split"), ("seen", "training records"))
            if name in eval_metrics
            for line in (
                f"## Evaluation: {name} ({title})",
                "",
                "| metric | base | tuned | delta |",
                "|---|---|---|---|",
                *[
                    f"| {k} | {m['base'][k]:.4f} | {m['tuned'][k]:.4f} | {m['delta'][k]:+.4f} |"
                    for m in [eval_metrics[name]]
                    for k in m["base"]
                ],
                "",
            )
        ],
    ]
    return "\n".join(lines)


def is_prompt_learning(adapter_dir: str | Path) -> bool:
    """Whether `adapter_dir` holds a P-tuning adapter: virtual tokens, no weights to merge."""
    path = Path(adapter_dir) / "adapter_config.json"
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("peft_type") == "P_TUNING"


def prompt_token(i: int) -> str:
    return f"<|tuneline_prompt_{i}|>"


def with_virtual_tokens(chosen: ChosenModel, adapter_dir: str | Path, dtype: str):
    """(model, tokenizer): the base with a P-tuning run's virtual tokens written into its vocabulary.

    peft prepends the prompt encoder's output (N vectors, fixed once trained) to the embedded input.
    Here each vector becomes the input embedding of a new special token, the chat template opens
    with those N tokens, and the generation config suppresses them, so a stock checkpoint computes
    what base + adapter computes: same vectors at positions 0..N-1, the text after them. Any
    OpenAI-compatible server that renders the chat template serves it as it is.
    """
    from peft import PeftModel

    from tuneline.model.modeling import load_base, load_tokenizer

    peft_model = PeftModel.from_pretrained(load_base(chosen, dtype), adapter_dir).eval()
    with torch.no_grad():
        prompt = peft_model.get_prompt(batch_size=1)[0]
    model = peft_model.get_base_model()
    tokenizer = load_tokenizer(str(adapter_dir))
    tokens = [prompt_token(i) for i in range(prompt.shape[0])]
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = model.get_input_embeddings()
    scale = getattr(
        embeddings, "embed_scale", 1.0
    )  # Gemma scales embeddings inside the module; peft's prompt is not
    with torch.no_grad():
        embeddings.weight[ids] = (prompt / scale).to(embeddings.weight.dtype)
        embedded = embeddings(torch.tensor(ids, device=embeddings.weight.device))
    if not torch.allclose(embedded.float(), prompt.float(), rtol=1e-2, atol=1e-3):
        raise ValueError(
            f"export: {type(embeddings).__name__} does not reproduce the virtual tokens' vectors"
        )
    tokenizer.chat_template = "".join(tokens) + tokenizer.chat_template
    model.generation_config.suppress_tokens = sorted({*(model.generation_config.suppress_tokens or []), *ids})
    return model, tokenizer


def export(chosen: ChosenModel, adapter_dir: str | Path, out_dir: str | Path, dtype: str) -> str:
    """Write the servable model to `out_dir`; return how: "merged" (LoRA, QLoRA, full weights), or
    "virtual tokens" for P-tuning, whose prompt goes into the vocabulary and chat template."""
    from tuneline.model.modeling import load_tokenizer

    out_dir = Path(out_dir)
    if is_prompt_learning(adapter_dir):
        model, tokenizer = with_virtual_tokens(chosen, adapter_dir, dtype)
        written = "virtual tokens"
    else:
        model, tokenizer = merged_model(chosen, adapter_dir, dtype), load_tokenizer(str(adapter_dir))
        written = "merged"
    # Greedy, stopping at the template's end of turn too: `tuneline serve` and a plain `generate` read
    # the saved generation_config.json, and a base's own one neither stops there nor decodes greedily.
    # P-tuning's virtual tokens stay suppressed.
    config = greedy_config(stop_ids(model, tokenizer, "auto"), tokenizer.pad_token_id)
    config.suppress_tokens = model.generation_config.suppress_tokens
    model.generation_config = config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return written
