"""Loading base models, tokenizers and adapters through the real `from_pretrained` path.

A name is a hub id (with network) or a local directory; safetensors only, and remote code
runs only when params turn `trust_remote_code` on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of `name`, with a pad token (the end-of-sequence token when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def nf4_config(compute_dtype: str) -> BitsAndBytesConfig:
    """QLoRA's quantisation: 4-bit NormalFloat with double quantisation."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
    )


def load_model(
    name: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantize_4bit: bool = False,
    dtype: str = "float32",
):
    """A causal LM from `name`; with `quantize_4bit`, its linear layers are bitsandbytes NF4."""
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True)
    if quantize_4bit:
        kwargs["quantization_config"] = nf4_config(dtype)
        kwargs["device_map"] = {"": str(device())}
    else:
        kwargs["dtype"] = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if not quantize_4bit:
        model.to(device())
    return model


def load_tuned(selected: dict, adapter_dir: str | Path, merge: bool = False):
    """The fine-tuned model: the base with the adapter from `adapter_dir` (or full weights there)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        return load_model(str(adapter_dir))
    base = load_model(selected["model"], selected.get("revision"), selected.get("trust_remote_code", False))
    model = PeftModel.from_pretrained(base, adapter_dir)
    if merge and model.peft_config["default"].is_prompt_learning:
        raise SystemExit("evaluate.merge is true, but a P-tuning adapter has no weights to merge; set evaluate.merge to false")
    return model.merge_and_unload() if merge else model


def tokenizer_hash(name: str) -> str:
    """A content hash of a local tokenizer's files (the hub id and revision stand for it otherwise)."""
    path = Path(name)
    if not path.is_dir():
        return ""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
