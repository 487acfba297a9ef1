"""GPU bench: train steps of 0.5B- and 8B-shaped models through tuneline's own training code, against TRL.

Models, built offline from a config with random weights (speed and memory do not depend on the values):
- `0p5b`: shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
  vocab 151,936, tied embeddings), saved once in bf16 and loaded by every run through
  `tuneline.model.training.prepare_model` -> `tuneline.model.modeling.load_model` (from_pretrained, as the
  stage does);
- `8b`: shaped like Llama-3-8B (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336,
  vocab 128,256), made on the GPU in bf16 and quantised in memory layer by layer to bitsandbytes NF4
  (double quantisation, bf16 compute: what `tuneline.model.modeling.nf4_config` asks from_pretrained for),
  so no 16 GB checkpoint is written; it is handed to `prepare_model` in place of `load_model`.

Data, shaped like instruction data: examples of a chat-template prompt (24 tokens plus a log-normal
instruction of median 20 tokens) and a log-normal answer (median 70 tokens, sigma 0.9: Alpaca's long
tail), random token ids, labels on the answer tokens only (as `tuneline.model.tokenization.encode_many`
labels them). tuneline packs them as the tokenize stage does (`tuneline.model.tokenization.pack_batch`:
best fit decreasing, in batches of 1000 examples) into a `datasets.Dataset`, and trains through
`tuneline.model.training.train`, whose collate is the library's: the bench copies neither.
TRL gets the same examples as `input_ids` + `completion_mask` (answer-only loss), twice: its
defaults (no packing, padded per batch) and its padding-free packing (`packing=True`, BFD).
TRL runs keep TRL's defaults (learning rate 2e-5, bf16, ...) except the batch size, max_length
(= seq_len), the steps and gradient checkpointing, which are the tuneline run's (TRL's default turns
it on; left so, the comparison would measure checkpointing, not the trainers).

Each configuration is its own process (its peak memory is its own). Repeats: after the warm-up
steps, `--repeats` consecutive windows of `--steps` optimizer steps each; the JSON gives every
window's tokens/s, their median and spread (max - min over median). They are windows of one run, not
fresh processes: a process start costs 15-20 s of the device budget, a window a few seconds.
Measured: non-padding tokens/s (the Trainer's `num_input_tokens_seen`); MFU = factor x N x tokens/s
(factor 6 for full fine-tuning, 4 for LoRA/QLoRA, whose frozen weights get no weight gradients;
N = every matmul's weights: the decoder's linear layers and the output head, not the embedding
lookup; recomputation under gradient checkpointing not counted) against the bf16 peak measured in
the same run (8192^3 matmuls) and the datasheet's (H200/H100 SXM: 989 TFLOP/s dense); attention
FLOPs apart (6 x layers x hidden x sum of each example's length^2 per step, causal within each
example: the useful work, not what a masked kernel computes); peak allocated and reserved memory
(for the 8B model, from after it was built).
Targets (issue 36): LoRA 0.5B tokens/s >= 1.5x TRL's defaults; full 0.5B MFU >= 35%; LoRA 0.5B
MFU >= 25%; QLoRA 8B at batch 1 x 2048 with gradient checkpointing <= 7.4 GiB peak, no Liger.

`--profile PATH`: torch.profiler over one LoRA 0.5B step (after the warm-up); the top 15 ops by
self device time (CPU time on a CPU) go to PATH as markdown.
Results are written to the JSON file after every configuration, so a run cut short keeps what finished.

Run:  python bench/gpu.py [--out bench/results/gpu.json] [--only lora_0p5b,trl_lora_0p5b] [--steps 8]
      python bench/gpu.py --profile bench/results/gpu_profile.md --only lora_0p5b
      python bench/gpu.py --tiny    # tiny shapes, few steps, on CPU too: checks the script end to end
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    "0p5b": dict(
        arch="qwen2",
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        arch="llama",
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
# Widths are multiples of 64: bitsandbytes quantises in blocks of 64.
TINY_SHAPES = {
    "0p5b": dict(
        SHAPES["0p5b"],
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),
    "8b": dict(
        SHAPES["8b"],
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        vocab_size=512,
    ),
}
# name: (model, method, implementation, gradient checkpointing, Liger, batch size). implementation:
# tuneline (packed as the stage packs), trl (TRL's defaults, unpacked) or trl_packed (TRL's
# padding-free packing). Most important first: a run cut short loses the least useful ones.
RUNS = {
    "lora_0p5b": ("0p5b", "lora", "tuneline", False, False, 8),
    "trl_lora_0p5b": ("0p5b", "lora", "trl", False, False, 8),
    "trl_packed_lora_0p5b": ("0p5b", "lora", "trl_packed", False, False, 8),
    "qlora_8b_gc": ("8b", "qlora", "tuneline", True, False, 1),
    "full_0p5b": ("0p5b", "full", "tuneline", False, False, 8),
    "trl_full_0p5b": ("0p5b", "full", "trl", False, False, 8),
    "trl_packed_full_0p5b": ("0p5b", "full", "trl_packed", False, False, 8),
    "trl_qlora_8b_gc": ("8b", "qlora", "trl", True, False, 1),
    "trl_packed_qlora_8b_gc": ("8b", "qlora", "trl_packed", True, False, 1),
    "lora_0p5b_liger": ("0p5b", "lora", "tuneline", False, True, 8),
}
DATASHEET_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
TARGETS = {
    "lora_vs_trl_defaults_tokens_per_s": 1.5,
    "full_0p5b_mfu": 0.35,
    "lora_0p5b_mfu": 0.25,
    "qlora_8b_gc_peak_gib": 7.4,
}
PROMPT_TEMPLATE_TOKENS = 24  # a chat template's system and role markers around the instruction


def model_config(shape: dict, pad_token_id: int):
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if shape["arch"] == "llama" else Qwen2Config
    return cls(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=shape["tie_word_embeddings"],
        pad_token_id=pad_token_id,
        use_cache=False,
    )


def build_tokenizer(out_dir: Path):
    """A small offline tokenizer (pad id 0): only its pad token and chat template are used, the data are
    token ids."""
    from tuneline.model.tinymodels import train_tokenizer

    texts = (ROOT / "data" / "seeds" / "seeds.jsonl").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer(texts, 512, "chatml")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_random_model(shape: dict, pad_token_id: int, device: str, dtype):
    """A causal LM of `shape` with random weights, made directly on `device` at `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape, pad_token_id), dtype=dtype)
    return model.eval()


def quantize_in_memory(model, compute_dtype) -> None:
    """Replace every linear layer of the decoder by a bitsandbytes NF4 layer (double quantisation),
    quantised from its own weights on their device: what from_pretrained with nf4_config does on load."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to(child.weight.device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del child
    # What from_pretrained sets on a 4-bit model: peft wraps its layers with its bitsandbytes LoRA
    # layers on this flag, and accelerate checks the device map against the training device.
    model.is_loaded_in_4bit = True
    model.hf_device_map = {"": model.device.index if model.device.type == "cuda" else "cpu"}


def quantized_8b(shapes: dict):
    """The 8B-shaped model in NF4 on this process's device, peak memory counted from here."""
    import torch

    from tuneline.model.modeling import DTYPES, device, resolve_dtype

    dtype = DTYPES[resolve_dtype("auto")]
    model = build_random_model(shapes["8b"], 0, str(device()), dtype)
    quantize_in_memory(model, dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return model


def matmul_parameters(shape: dict) -> int:
    """N of the MFU formula: weights of every matmul (decoder linear layers and the output head)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_heads"] * shape["num_kv_heads"]
    per_layer = h * h * 2 + h * kv * 2 + h * i * 3
    return shape["num_layers"] * per_layer + v * h


def instruction_examples(
    n_tokens: int, seq_len: int, vocab: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """Instruction-like examples, `n_tokens` in all: a prompt (template + log-normal instruction, median
    20 tokens at seq_len 2048) with no labels, then a log-normal answer (median 70) labelled, at most
    seq_len tokens in all; ids 1..vocab-1 (0 is padding). Lengths scale with seq_len / 2048."""
    rng = random.Random(seed)
    scale = seq_len / 2048
    out, total = [], 0
    while total < n_tokens:
        prompt = max(2, round((PROMPT_TEMPLATE_TOKENS + rng.lognormvariate(math.log(20), 0.8)) * scale))
        answer = max(1, min(round(rng.lognormvariate(math.log(70), 0.9) * scale), seq_len - prompt))
        ids = [rng.randrange(1, vocab) for _ in range(prompt + answer)]
        out.append((ids, [-100] * prompt + ids[prompt:]))
        total += len(ids)
    return out


def packed_dataset(data: list, seq_len: int, n_rows: int):
    """The rows tuneline trains on: the tokenize stage's packing (pack_batch, batches of 1000 examples)."""
    from datasets import Dataset

    from tuneline.model.tokenization import pack_batch

    examples = Dataset.from_dict(
        {"input_ids": [ids for ids, _ in data], "labels": [labels for _, labels in data]}
    )
    packed = examples.map(
        pack_batch,
        batched=True,
        batch_size=1000,
        fn_kwargs=dict(max_length=seq_len),
        remove_columns=examples.column_names,
    )
    if len(packed) < n_rows:
        raise SystemExit(f"bench: {len(packed)} packed rows of data, {n_rows} needed")
    return packed.select(range(n_rows))


def attention_flops_per_token(data: list, shape: dict) -> float:
    """Training attention FLOPs per token: 6 x layers x hidden x sum(len^2) / sum(len) (QK^T and AV,
    2 FLOPs a multiply-add, causal half, forward + twice backward)."""
    lengths = [len(ids) for ids, _ in data]
    return 6 * shape["num_layers"] * shape["hidden_size"] * sum(n * n for n in lengths) / sum(lengths)


class StepTimer:
    """Wall time and non-padding tokens seen at the end of every optimizer step; with `profile_at`,
    a torch.profiler trace of that step."""

    def __init__(self, profile_at: int | None = None) -> None:
        from transformers import TrainerCallback

        marks = self.marks = []
        timer = self
        self.profiler = None

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if profile_at is not None and state.global_step == profile_at:
                    timer.start_profile()

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.append((time.perf_counter(), state.num_input_tokens_seen))
                if timer.profiler is not None and timer.profiler_open:
                    timer.profiler.stop()
                    timer.profiler_open = False

        self.callback = Callback()
        self.profiler_open = False

    def start_profile(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities, record_shapes=False)
        self.profiler.start()
        self.profiler_open = True

    def windows(self, warmup: int, steps: int) -> list[tuple[int, float]]:
        """(tokens, seconds) of each window of `steps` steps after the first `warmup`."""
        out = []
        for start in range(warmup - 1, len(self.marks) - steps, steps):
            (t0, n0), (t1, n1) = self.marks[start], self.marks[start + steps]
            out.append((n1 - n0, t1 - t0))
        return out


def train_settings(method: str, batch: int, steps: int, gc: bool, liger: bool):
    import dataclasses

    from tuneline.common import params

    p = params.section("train", path=ROOT / "params.yaml")
    return dataclasses.replace(
        p,
        method=method,
        lora_r=16,
        lora_alpha=32,
        batch_size=batch,
        grad_accum=1,
        max_steps=steps,
        gradient_checkpointing=gc,
        use_liger_kernel=liger,
        compute_dtype="auto",
        attn_implementation="sdpa",
        save_steps=10**9,
        logging_steps=10**9,
        epochs=1,
        neftune_noise_alpha=0.0,
    )


def tuneline_run(
    run: tuple, work: Path, shapes: dict, data: list, seq_len: int, steps: int, timer: StepTimer
) -> dict:
    """tuneline.model.training.train on the stage's packing of `data`; the 8B model is built and quantised
    here first."""
    import tuneline.model.training

    model_name, method, _, gc, liger, batch = run
    p = train_settings(method, batch, steps, gc, liger)
    from tuneline.common.records import chosen_model

    # the 8b model itself is made here, not loaded: only its tokenizer is read
    selected = chosen_model(
        {
            "name": model_name,
            "kind": "local",
            "model": str(work / ("tokenizer" if model_name == "8b" else "0p5b")),
        }
    )
    load_model = tuneline.model.training.load_model
    if model_name == "8b":
        model = quantized_8b(shapes)
        tuneline.model.training.load_model = lambda *args, **kwargs: model  # prepare_model does the rest
    try:
        trained, _, metrics = tuneline.model.training.train(
            selected,
            p,
            packed_dataset(data, seq_len, batch * steps),
            None,
            work / f"checkpoints-{model_name}-{method}",
            0,
            [timer.callback],
        )
    finally:
        tuneline.model.training.load_model = load_model
    lora_layers = sorted(
        {f"{type(m).__module__}.{type(m).__name__}" for m in trained.modules() if hasattr(m, "lora_A")}
    )
    return {
        "trainable_parameters": metrics["trainable_parameters"],
        "train_loss": metrics.get("train_loss"),
        "lora_layer_types": lora_layers,
    }


def trl_run(
    run: tuple, work: Path, shapes: dict, data: list, seq_len: int, steps: int, timer: StepTimer
) -> dict:
    """The baseline: a plain TRL SFTTrainer script on the same model, examples and LoRA config."""
    import torch
    from datasets import Dataset
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tuneline.model.training import peft_config

    model_name, method, impl, gc, liger, batch = run
    p = train_settings(method, batch, steps, gc, liger)
    cuda = torch.cuda.is_available()
    if model_name == "8b":
        model = prepare_model_for_kbit_training(quantized_8b(shapes), use_gradient_checkpointing=gc)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            work / "0p5b",
            dtype=torch.bfloat16 if cuda else torch.float32,
            attn_implementation="sdpa",
            device_map={"": 0} if cuda else None,
        )
    rows = [
        {"input_ids": ids, "completion_mask": [int(label != -100) for label in labels]}
        for ids, labels in data
    ]
    config = SFTConfig(
        output_dir=str(work / f"trl-{impl}-{model_name}-{method}"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        max_length=seq_len,
        packing=impl == "trl_packed",
        gradient_checkpointing=gc,
        save_strategy="no",
        report_to=[],
        logging_steps=10**9,
        bf16=cuda,
        use_cpu=not cuda,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(work / "tokenizer"),
        peft_config=peft_config(p) if method != "full" else None,
        callbacks=[timer.callback],
    )
    result = trainer.train()
    trainable = sum(x.numel() for x in trainer.model.parameters() if x.requires_grad)
    return {
        "trainable_parameters": trainable,
        "train_loss": result.metrics.get("train_loss"),
        "trl_settings": {
            k: getattr(config, k)
            for k in (
                "learning_rate",
                "packing",
                "packing_strategy",
                "padding_free",
                "gradient_checkpointing",
                "bf16",
                "max_length",
            )
        },
    }


def spread(values: list[float]) -> dict:
    """Median, min, max and (max - min) / median of `values`."""
    median = statistics.median(values)
    return {
        "median": round(median, 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
        "spread": round((max(values) - min(values)) / median, 4) if median else None,
    }


def one_run(
    name: str,
    work: Path,
    tiny: bool,
    steps: int,
    warmup: int,
    repeats: int,
    seq_len: int,
    profile: Path | None = None,
) -> dict:
    """Run `name` in this process; its throughput per window, MFU inputs and peak memory."""
    import torch

    run = RUNS[name]
    shapes = TINY_SHAPES if tiny else SHAPES
    model_name, method, impl, gc, liger, batch = run
    total_steps = warmup + repeats * steps
    timer = StepTimer(profile_at=warmup if profile else None)
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Enough examples for every step: packed rows hold ~seq_len tokens, unpacked batches far fewer.
    data = instruction_examples(
        batch * total_steps * seq_len + seq_len, seq_len, shapes[model_name]["vocab_size"], 0
    )
    extra = (tuneline_run if impl == "tuneline" else trl_run)(
        run, work, shapes, data, seq_len, total_steps, timer
    )
    windows = timer.windows(warmup, steps)
    if not windows:
        raise SystemExit(f"bench: {name} ran {len(timer.marks)} steps, fewer than {warmup} + {steps}")
    rates = [tokens / seconds for tokens, seconds in windows]
    n = matmul_parameters(shapes[model_name])
    flops_per_token = (6 if method == "full" else 4) * n
    tokens_per_s = statistics.median(rates)
    attention = attention_flops_per_token(data, shapes[model_name])
    result = {
        "model": model_name,
        "method": method,
        "implementation": impl,
        "gradient_checkpointing": gc,
        "liger": liger,
        "batch_size": batch,
        "seq_len": seq_len,
        "steps": len(timer.marks),
        "warmup_steps": warmup,
        "window_steps": steps,
        "windows": [{"tokens": t, "seconds": round(s, 4)} for t, s in windows],
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_windows": spread(rates),
        "tokens_per_step": round(sum(t for t, _ in windows) / (len(windows) * steps), 1),
        "matmul_parameters": n,
        "flops_per_token": flops_per_token,
        "achieved_tflops": round(tokens_per_s * flops_per_token / 1e12, 3),
        "attention_flops_per_token": round(attention),
        "attention_tflops": round(tokens_per_s * attention / 1e12, 3),
        "wall_s": round(time.perf_counter() - start, 1),
        **extra,
    }
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    if profile:
        write_profile(timer.profiler, profile, name, result)
    return result


def write_profile(profiler, path: Path, name: str, result: dict) -> None:
    """The top 15 ops of the profiled step by self device time (CPU time without a GPU), as markdown."""
    import torch

    cuda = torch.cuda.is_available()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# Profile of one `{name}` training step\n\n"
        f"Device: {device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Step {result['warmup_steps'] + 1} of {result['steps']} (after the warm-up), batch "
        f"{result['batch_size']} x "
        f"{result['seq_len']} tokens packed as the tokenize stage packs; the run's median "
        f"{result['tokens_per_s']:,.0f} "
        f"tokens/s. Top 15 ops by {'self CUDA' if cuda else 'self CPU'} time (torch.profiler):\n\n"
        f"```\n{table}\n```\n",
        encoding="utf-8",
    )


def measured_peak_tflops(tiny: bool) -> float | None:
    """bf16 matmul throughput of this GPU: the best of a few timed rounds of large square matmuls."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = 1024 if tiny else 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * 20 / (time.perf_counter() - t) / 1e12)
    del a, b
    torch.cuda.empty_cache()
    return round(best, 1)


def datasheet_tflops(device_name: str) -> float | None:
    return next((v for k, v in DATASHEET_TFLOPS.items() if k in device_name), None)


def run_arguments(args) -> list[str]:
    return [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--seq-len",
        str(args.seq_len),
    ] + (["--tiny"] if args.tiny else [])


def child(name: str, work: Path, args, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--run", name, "--work", str(work), *run_arguments(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return {"error": f"timed out after {timeout:.0f} s", "log_tail": str(err.stderr or "")[-1500:]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {
            "error": f"exit code {proc.returncode}",
            "log_tail": (proc.stdout[-500:] + proc.stderr[-2500:]),
        }
    return json.loads(lines[-1][len("RESULT ") :])


def in_process(name: str, work: Path, args, profile: Path | None = None) -> dict:
    try:
        return one_run(name, work, args.tiny, args.steps, args.warmup, args.repeats, args.seq_len, profile)
    except Exception as err:  # noqa: BLE001 - one failed configuration must not lose the others' results
        import traceback

        return {"error": f"{type(err).__name__}: {err}", "log_tail": traceback.format_exc()[-2500:]}


def summary(results: dict) -> dict:
    """The comparisons and targets from the runs done so far."""
    runs, peak, sheet = (
        results["runs"],
        results["peak_bf16_tflops_measured"],
        results["peak_bf16_tflops_datasheet"],
    )
    for r in runs.values():
        if "tokens_per_s" in r:
            r["mfu_vs_measured_peak"] = round(r["achieved_tflops"] / peak, 4) if peak else None
            r["mfu_vs_datasheet"] = round(r["achieved_tflops"] / sheet, 4) if sheet else None
    ok = {k: r for k, r in runs.items() if "tokens_per_s" in r}
    out = {}
    for config in ("lora_0p5b", "full_0p5b", "qlora_8b_gc"):
        if config not in ok:
            continue
        out[f"{config}_mfu"] = ok[config]["mfu_vs_datasheet"]
        out[f"{config}_mfu_vs_measured_peak"] = ok[config]["mfu_vs_measured_peak"]
        for trl, label in ((f"trl_{config}", "trl_defaults"), (f"trl_packed_{config}", "trl_packed")):
            if trl in ok:
                out[
                    f"{config.split('_')[0]}_vs_{label}_tokens_per_s"
                    if config == "lora_0p5b"
                    else f"{config}_vs_{label}_tokens_per_s"
                ] = round(ok[config]["tokens_per_s"] / ok[trl]["tokens_per_s"], 3)
    if "lora_0p5b_liger" in ok and "lora_0p5b" in ok:
        out["liger_speedup"] = round(
            ok["lora_0p5b_liger"]["tokens_per_s"] / ok["lora_0p5b"]["tokens_per_s"], 3
        )
    if "qlora_8b_gc" in ok and "peak_allocated_gib" in ok["qlora_8b_gc"]:
        out["qlora_8b_gc_peak_gib"] = ok["qlora_8b_gc"]["peak_allocated_gib"]
    met = {}
    for key, target in TARGETS.items():
        if out.get(key) is not None:
            met[key] = out[key] <= target if key.endswith("_gib") else out[key] >= target
    return {"comparisons": out, "targets": TARGETS, "targets_met": met}


def write(results: dict, out: Path) -> None:
    results.update(summary(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def table(results: dict) -> str:
    head = (
        f"| {'run':<22} | {'tokens/s':>9} | {'spread':>6} | {'TFLOP/s':>7} | {'attn TF/s':>9} | "
        f"{'MFU sheet':>9} | "
        f"{'MFU meas.':>9} | {'peak alloc GiB':>14} | {'reserved GiB':>12} |"
    )
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for name, r in results["runs"].items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {name:<22} | {r.get('error') or r.get('skipped')} |")
            continue
        lines.append(
            f"| {name:<22} | {r['tokens_per_s']:>9,.0f} | "
            f"{fmt(r['tokens_per_s_windows']['spread'], '>6.1%')} | "
            f"{r['achieved_tflops']:>7.1f} | {r['attention_tflops']:>9.1f} | "
            f"{fmt(r.get('mfu_vs_datasheet'), '>9.1%'):>9} | "
            f"{fmt(r.get('mfu_vs_measured_peak'), '>9.1%'):>9} | "
            f"{fmt(r.get('peak_allocated_gib'), '>14.2f'):>14} | "
            f"{fmt(r.get('peak_reserved_gib'), '>12.2f'):>12} |"
        )
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "trl",
        "liger-kernel",
        "datasets",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def missing_packages(run: tuple, cuda: bool) -> str | None:
    """Why `run` cannot run here, or None."""
    import importlib.util

    needs = (
        (["liger_kernel"] if run[4] else [])
        + (["trl"] if run[2] != "tuneline" else [])
        + (["bitsandbytes"] if run[1] == "qlora" else [])
    )
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    return None if cuda or not run[4] else "needs a GPU (Liger is Triton)"


def save_0p5b(work: Path, tiny: bool, cuda: bool) -> None:
    """The tokenizer and the 0.5B-shaped checkpoint every 0.5B run loads."""
    import torch

    tokenizer = build_tokenizer(work / "tokenizer")
    shape = (TINY_SHAPES if tiny else SHAPES)["0p5b"]
    model = build_random_model(
        shape, tokenizer.pad_token_id, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32
    )
    model.save_pretrained(work / "0p5b")
    tokenizer.save_pretrained(work / "0p5b")
    del model
    if cuda:
        torch.cuda.empty_cache()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    parser.add_argument(
        "--only", help="comma-separated run names (default: all, in order): " + ", ".join(RUNS)
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes, few steps (CPU too): checks the script"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per measured window (default 6; --tiny 1)")
    parser.add_argument("--repeats", type=int, default=3, help="measured windows per run (default 3)")
    parser.add_argument("--warmup", type=int, help="steps run before measuring (default 3; --tiny 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 2048; --tiny 128)")
    parser.add_argument("--run-timeout", type=float, default=90, help="seconds one configuration may take")
    parser.add_argument(
        "--profile", type=Path, help="profile one lora_0p5b step into this markdown file, and stop"
    )
    parser.add_argument("--append", action="store_true", help="keep the runs already in --out and add these")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every configuration in this process (quicker on CPU; peak memory is then not per run)",
    )
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # a child process: one run
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (1 if args.tiny else 6)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    return args


def main() -> None:
    args = parse_args()
    if args.run:
        print(
            "RESULT "
            + json.dumps(
                one_run(args.run, args.work, args.tiny, args.steps, args.warmup, args.repeats, args.seq_len)
            )
        )
        return

    import torch

    names = ["lora_0p5b"] if args.profile else (args.only.split(",") if args.only else list(RUNS))
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"bench: unknown run {unknown[0]!r}; runs are {', '.join(RUNS)}")
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            save_0p5b(Path(tmp), args.tiny, cuda)
            args.repeats = 1
            r = in_process("lora_0p5b", Path(tmp), args, profile=args.profile)
        print(
            f"profile of lora_0p5b: {r.get('error') or format(r['tokens_per_s'], ',.0f') + ' tokens/s'}; "
            f"wrote {args.profile}"
        )
        if "error" in r:
            raise SystemExit(r["log_tail"])
        return
    results = {
        "device": device_name,
        "platform": platform.platform(),
        "versions": versions(),
        "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "peak_bf16_tflops_measured": measured_peak_tflops(args.tiny),
        "peak_bf16_tflops_datasheet": datasheet_tflops(device_name) if cuda else None,
        "settings": {
            "seq_len": args.seq_len,
            "window_steps": args.steps,
            "windows": args.repeats,
            "warmup_steps": args.warmup,
            "compute_dtype": "auto (bfloat16 on a GPU that has it)",
            "attn_implementation": "sdpa",
            "data": "instruction-like: prompt 24 + lognormal(median 20) tokens unlabelled, answer "
            "lognormal(median 70,"
            " sigma 0.9) labelled, lengths x seq_len/2048",
        },
        "shapes": {
            k: {**v, "matmul_parameters": matmul_parameters(v)}
            for k, v in (TINY_SHAPES if args.tiny else SHAPES).items()
        },
        "runs": {},
    }
    if args.append and args.out.exists():
        results["runs"] = json.loads(args.out.read_text(encoding="utf-8"))["runs"]
    print(
        f"gpu bench on {device_name}: measured bf16 peak {results['peak_bf16_tflops_measured']} TFLOP/s, "
        f"datasheet {results['peak_bf16_tflops_datasheet']}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_0p5b(work, args.tiny, cuda)
        for name in names:
            why_not = missing_packages(RUNS[name], cuda)
            if why_not:
                results["runs"][name] = {"skipped": why_not}
            else:
                start = time.perf_counter()
                results["runs"][name] = (
                    in_process(name, work, args)
                    if args.in_process
                    else child(name, work, args, args.run_timeout)
                )
                results["runs"][name].setdefault("wall_s", round(time.perf_counter() - start, 1))
            write(results, args.out)
            r = results["runs"][name]
            print(
                f"  {name}: "
                + (
                    r.get("skipped")
                    or r.get("error")
                    or f"{r['tokens_per_s']:,.0f} tokens/s (spread {r['tokens_per_s_windows']['spread']}), "
                    f"{r['achieved_tflops']} TFLOP/s"
                    + (f", peak {r['peak_allocated_gib']} GiB" if "peak_allocated_gib" in r else "")
                    + f", {r['wall_s']} s"
                ),
                flush=True,
            )
            if "error" in r:
                print("    " + r.get("log_tail", "")[-1200:].replace("\n", "\n    "), flush=True)
    write(results, args.out)
    print("\n" + table(results))
    for key, value in results["comparisons"].items():
        verdict = (
            ""
            if key not in results["targets_met"]
            else (
                f" (target {'<=' if key.endswith('_gib') else '>='} {TARGETS[key]}: "
                f"{'met' if results['targets_met'][key] else 'NOT met'})"
            )
        )
        print(f"{key}: {value}{verdict}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
