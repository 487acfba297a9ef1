"""Loading base models, tokenizers and adapters through the real `from_pretrained` path.

A name is a hub id (with network) or a local directory; safetensors only, and remote code
runs only when params turn `trust_remote_code` on.
"""

from __future__ import annotations

import json
import os
import random
import socket
import urllib.parse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from tuneline.common.logs import route_transformers_logging
from tuneline.common.params import ParamsError
from tuneline.common.records import ChosenModel

# A stage's transformers warnings go to its log file and (unless known-harmless) the terminal.
route_transformers_logging()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices), as transformers' set_seed does.

    transformers' own lives in `transformers.trainer_utils`, whose import pulls in peft and, through
    it, bitsandbytes and torch's compiler: about 7 s per process, for stages that train nothing.
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    """This process's device: under `accelerate launch`/torchrun each rank has its own GPU (LOCAL_RANK)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_dtype(name: str) -> str:
    """`auto`: bfloat16 where the GPU supports it, else float16 on a GPU, float32 on CPU; other names as
    given."""
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def sharded_launch() -> bool:
    """Whether `accelerate launch` runs FSDP or DeepSpeed: the model then loads on CPU and the
    Trainer shards it, instead of every rank holding a whole copy on its GPU."""
    return any(
        os.environ.get(k, "").lower() in ("1", "true")
        for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


def device_map() -> dict | None:
    """Where from_pretrained puts the weights: this rank's own GPU, or None (CPU, or sharded by the Trainer).

    Without it every rank of a multi-GPU run loads onto GPU 0, and accelerate refuses to train a
    4-bit model on a device other than the one it was loaded on.
    """
    if not torch.cuda.is_available() or sharded_launch():
        return None
    return {"": local_rank()}


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a directory: a hub id is `name` or `owner/name`, never more."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within `timeout_s` (the hub client retries for a
    minute)."""
    url = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout_s
        ).close()
        return True
    except OSError:
        return False


def check_model_source(name: str, revision: str | None, key: str) -> None:
    """Fail within seconds, naming the params `key` and the fix, when `name` is neither a saved model
    directory nor a hub id this process can load: from_pretrained would give an 80-line traceback
    ("Repo id must be in the form...") for a missing path, and retry for a minute while offline."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ParamsError(
                f"{key} {name!r} is a directory without config.json, not a saved model; point {key} at "
                "the directory save_pretrained wrote (or a hub id)"
            )
        return
    if looks_like_path(name) or path.exists():
        raise ParamsError(
            f"{key} {name!r}: no such model directory; fix the path, or build it first "
            "(`dvc repro models` writes models/base/<name>)"
        )
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return  # in the local hub cache: loads offline too
    if constants.HF_HUB_OFFLINE:
        raise ParamsError(
            f"{key} {name!r} is a hub id that is not in the local hub cache ({constants.HF_HUB_CACHE}) and "
            f"the hub is off (HF_HUB_OFFLINE): download it while online (`hf download {name}`), or set "
            f"{key} to a local model directory"
        )
    if not hub_reachable(constants.ENDPOINT):
        raise ParamsError(
            f"{key} {name!r} is a hub id, but {constants.ENDPOINT} cannot be reached and it is not in the "
            f"local hub cache: download it where there is a network (`hf download {name}`), or set {key} "
            "to a local model directory"
        )


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
        bnb_4bit_compute_dtype=DTYPES[resolve_dtype(compute_dtype)],
    )


def load_model(
    name: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantize_4bit: bool = False,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
):
    """A causal LM from `name` at `dtype` (`auto`: see resolve_dtype), on this rank's device; with
    `quantize_4bit`, its linear layers are bitsandbytes NF4 computing at `dtype` and the rest is at `dtype`.

    `sdpa` is transformers' own default: SDPA where the architecture has it, eager attention where it
    has not (Gemma 2, whose attention soft-capping SDPA cannot do); asked for by name, it would refuse those.
    """
    kwargs = dict(
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=DTYPES[resolve_dtype(dtype)],
        attn_implementation=None if attn_implementation == "sdpa" else attn_implementation,
    )
    placement = device_map()
    if quantize_4bit:
        kwargs["quantization_config"] = nf4_config(dtype)
        placement = placement or {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(name, device_map=placement, **kwargs)
    return model


def trained_4bit(adapter_dir: str | Path) -> bool:
    """Whether the run in `adapter_dir` trained over a 4-bit base (QLoRA), from its training_args.json."""
    path = Path(adapter_dir) / "training_args.json"
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("method") == "qlora"


def load_base(
    chosen: ChosenModel, dtype: str = "auto", quantize_4bit: bool = False, dequantized: bool = False
):
    """The chosen base model at `dtype`, 4-bit when asked (to score a QLoRA run's base as it was
    trained over), and then `dequantized` to `dtype` when asked (the weights a QLoRA merge goes into)."""
    model = load_model(
        chosen.name_or_path,
        chosen.revision,
        chosen.trust_remote_code,
        quantize_4bit=quantize_4bit,
        dtype=dtype,
    )
    return model.dequantize(dtype=DTYPES[resolve_dtype(dtype)]) if quantize_4bit and dequantized else model


def load_tuned(chosen: ChosenModel, adapter_dir: str | Path, merge: bool = False, dtype: str = "auto"):
    """The fine-tuned model: the base with the adapter from `adapter_dir` (or full weights there), at
    `dtype`. A QLoRA adapter goes onto the 4-bit base it was trained over (the model as trained);
    merged, onto that base dequantised to `dtype` (`dequantize()`), as export merges it: what is
    scored is then exactly what export writes and serving computes."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        return load_model(str(adapter_dir), dtype=dtype)
    base = load_base(chosen, dtype, quantize_4bit=trained_4bit(adapter_dir), dequantized=merge)
    model = PeftModel.from_pretrained(base, adapter_dir)
    if merge and model.peft_config["default"].is_prompt_learning:
        raise ParamsError(
            "evaluate.merge is true, but a P-tuning adapter has no weights to merge; set evaluate.merge to "
            "false"
        )
    return model.merge_and_unload().to(DTYPES[resolve_dtype(dtype)]) if merge else model
