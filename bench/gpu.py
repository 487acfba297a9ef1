"""GPU bench: train steps of 0.5B- and 8B-shaped models through tuneline's own training code, against TRL.

Models, built offline from a config with random weights (speed and memory do not depend on the values):
- `0p5b`: shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
  vocab 151,936, tied embeddings), initialised on the GPU in bf16, saved once and loaded by every run
  through `tuneline.training.prepare_model` -> `tuneline.modeling.load_model` (from_pretrained, as the
  train stage loads a hub model);
- `8b`: shaped like Llama-3-8B (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336,
  vocab 128,256), initialised on the GPU in bf16 and quantised in memory layer by layer to
  bitsandbytes NF4 (double quantisation, bf16 compute: what `tuneline.modeling.nf4_config` asks
  from_pretrained for), so no 16 GB checkpoint is written; it is handed to `prepare_model` in place of
  `load_model`, and everything after that (peft wrapping, TrainingArguments, Trainer, collate) is
  tuneline's own code, as in `tuneline.training.train`.

Data: random token ids in examples of random length (seq_len/8 to seq_len), all tokens but the first
labelled. Packing on: whole examples packed into rows of at most seq_len tokens with restarting
position ids (`tuneline.tokenization.pack`, padding-free: no attention mask, use_cache=False);
packing off: one example per row, padded to the longest in the batch.
Settings: params.yaml's train section, with compute_dtype auto (bf16), sdpa attention, and the
method, batch size, gradient checkpointing and Liger switches of each run.

Each run is its own process (its peak memory is its own, and Liger patches modules in place).
Measured: non-padding tokens/s over the steps after the warm-up ones (the Trainer's
`num_input_tokens_seen`), model FLOPs utilisation (6·N FLOPs per token for full fine-tuning, 4·N for
LoRA/QLoRA, whose frozen weights get no weight gradients; N = the parameters of every matmul: the
decoder's linear layers and the output head, not the embedding lookup; recomputation under gradient
checkpointing is not counted) against the bf16 peak measured in the same run with a large matmul and
against the datasheet's (H200/H100 SXM: 989 TFLOP/s dense), and peak GPU memory
(torch.cuda.max_memory_allocated and max_memory_reserved; for the 8B model from after it was built).
Baseline: `trl_lora_0p5b`, a plain TRL SFTTrainer script on the same 0.5B checkpoint and examples
(from_pretrained in bf16, the same LoRA config, TRL's own padding-free packing, no tuneline code but
`peft_config`).
Targets (issue 15): LoRA MFU >= 40% on the 0.5B shape; QLoRA on the 8B shape <= 8 GiB peak at batch
1 x 2048 with gradient checkpointing; tuneline LoRA tokens/s >= TRL's.

Results are written to the JSON file after every run, so a run cut short still leaves data.

Run:  python bench/gpu.py [--out bench/results/gpu.json] [--only lora_0p5b,trl_lora_0p5b] [--steps 10]
      python bench/gpu.py --tiny    # tiny shapes, 2 steps, on CPU too: checks the script end to end
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
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
    "0p5b": dict(arch="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                 vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(arch="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
               vocab_size=128256, tie_word_embeddings=False),
}
# Widths are multiples of 64: bitsandbytes quantises in blocks of 64.
TINY_SHAPES = {
    "0p5b": dict(SHAPES["0p5b"], hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 vocab_size=512),
    "8b": dict(SHAPES["8b"], hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
               vocab_size=512),
}
# name: (model, method, implementation, packing, gradient checkpointing, Liger, batch size). Most
# important first: a run cut short by the time limit loses the least useful ones.
RUNS = {
    "lora_0p5b": ("0p5b", "lora", "tuneline", True, False, False, 8),
    "trl_lora_0p5b": ("0p5b", "lora", "trl", True, False, False, 8),
    "qlora_8b_gc": ("8b", "qlora", "tuneline", True, True, False, 1),
    "qlora_8b_gc_liger": ("8b", "qlora", "tuneline", True, True, True, 1),
    "lora_0p5b_liger": ("0p5b", "lora", "tuneline", True, False, True, 8),
    "full_0p5b": ("0p5b", "full", "tuneline", True, False, False, 8),
    "qlora_0p5b": ("0p5b", "qlora", "tuneline", True, False, False, 8),
    "lora_0p5b_gc": ("0p5b", "lora", "tuneline", True, True, False, 8),
    "lora_0p5b_unpacked": ("0p5b", "lora", "tuneline", False, False, False, 8),
    "qlora_8b": ("8b", "qlora", "tuneline", True, False, False, 1),
    "full_0p5b_liger": ("0p5b", "full", "tuneline", True, False, True, 8),
}
DATASHEET_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
TARGETS = {"lora_0p5b_mfu": 0.40, "qlora_8b_gc_peak_gib": 8.0, "lora_vs_trl_tokens_per_s": 1.0}


def model_config(shape: dict, pad_token_id: int):
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if shape["arch"] == "llama" else Qwen2Config
    return cls(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
               num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
               num_key_value_heads=shape["num_kv_heads"], max_position_embeddings=4096,
               tie_word_embeddings=shape["tie_word_embeddings"], pad_token_id=pad_token_id, use_cache=False)


def build_tokenizer(out_dir: Path):
    """A small offline tokenizer (pad id 0): only its pad token and chat template are used, the data are token ids."""
    from tuneline.tinymodels import train_tokenizer

    texts = [line for line in (ROOT / "data" / "seeds" / "seeds.jsonl").read_text(encoding="utf-8").splitlines()]
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
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(child.weight.device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del child
    # What from_pretrained sets on a 4-bit model: peft wraps its layers with its bitsandbytes LoRA
    # layers on this flag, and accelerate checks the device map against the training device.
    model.is_loaded_in_4bit = True
    model.hf_device_map = {"": model.device.index if model.device.type == "cuda" else "cpu"}


def matmul_parameters(shape: dict) -> int:
    """N of the MFU formula: weights of every matmul (decoder linear layers and the output head)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_heads"] * shape["num_kv_heads"]
    per_layer = h * h * 2 + h * kv * 2 + h * i * 3
    return shape["num_layers"] * per_layer + v * h


def examples(n_tokens: int, seq_len: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Random examples (ids 1..vocab-1: 0 is padding) of seq_len/8 to seq_len tokens, `n_tokens` in all."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < n_tokens:
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(seq_len // 8, seq_len))]
        out.append((ids, [-100] + ids[1:]))
        total += len(ids)
    return out


def rows(data: list, seq_len: int, packing: bool, n_rows: int) -> list[dict]:
    """The training rows: packed (tuneline.tokenization.pack) or one example each."""
    from tuneline.tokenization import pack

    if packing:
        packed = [{k: p[k] for k in ("input_ids", "labels", "position_ids")} for p in pack(iter(data), seq_len)]
    else:
        packed = [{"input_ids": ids, "labels": labels} for ids, labels in data]
    if len(packed) < n_rows:
        raise SystemExit(f"bench: {len(packed)} rows of data, {n_rows} needed")
    return packed[:n_rows]


class StepTimer:
    """Wall time and non-padding tokens seen at the end of every optimizer step."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        marks = self.marks = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.append((time.perf_counter(), state.num_input_tokens_seen))

        self.callback = Callback()

    def measured(self, warmup: int) -> tuple[int, float]:
        (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
        return n1 - n0, t1 - t0


def train_settings(method: str, batch: int, steps: int, gc: bool, liger: bool):
    from tuneline import params

    p = params.section("train", path=ROOT / "params.yaml")
    return dataclasses.replace(p, method=method, lora_r=8, lora_alpha=16,  # the first GPU run's rank
                                batch_size=batch, max_steps=steps, gradient_checkpointing=gc,
                               use_liger_kernel=liger, compute_dtype="auto", attn_implementation="sdpa",
                               save_steps=10**9, logging_steps=10**9, epochs=1)


def tuneline_run(run: tuple, work: Path, shapes: dict, seq_len: int, steps: int, timer: StepTimer) -> dict:
    """tuneline.training.train on the run's rows; the 8B model is built and quantised here first."""
    import torch

    import tuneline.training
    from tuneline.modeling import DTYPES, device, resolve_dtype

    model_name, method, _, packing, gc, liger, batch = run
    p = train_settings(method, batch, steps, gc, liger)
    selected = {"name": model_name, "kind": "local", "model": str(work / "0p5b")}
    if model_name == "8b":
        selected["model"] = str(work / "tokenizer")  # the model itself is made here, not loaded
        dtype = DTYPES[resolve_dtype(p.compute_dtype)]
        model = build_random_model(shapes["8b"], 0, str(device()), dtype)
        quantize_in_memory(model, dtype)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    data = rows(examples(batch * steps * seq_len * 2, seq_len, shapes[model_name]["vocab_size"], 0), seq_len, packing,
                batch * steps)
    load_model = tuneline.training.load_model
    if model_name == "8b":
        tuneline.training.load_model = lambda *args, **kwargs: model  # prepare_model does the rest
    try:
        trained, _, metrics = tuneline.training.train(selected, p, data, None, work / f"checkpoints-{name_of(run)}", 0,
                                                      [timer.callback])
    finally:
        tuneline.training.load_model = load_model
    lora_layers = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in trained.modules() if hasattr(m, "lora_A")})
    return {"trainable_parameters": metrics["trainable_parameters"], "train_loss": metrics.get("train_loss"),
            "lora_layer_types": lora_layers}


def name_of(run: tuple) -> str:
    return next(name for name, r in RUNS.items() if r == run)


def trl_run(run: tuple, work: Path, shapes: dict, seq_len: int, steps: int, timer: StepTimer) -> dict:
    """The baseline: a plain TRL SFTTrainer script on the same checkpoint, examples and LoRA config."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tuneline.training import peft_config

    model_name, method, _, packing, gc, liger, batch = run
    p = train_settings(method, batch, steps, gc, liger)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(work / "0p5b", dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation="sdpa", device_map={"": 0} if cuda else None)
    data = examples(batch * steps * seq_len * 2, seq_len, shapes[model_name]["vocab_size"], 0)
    config = SFTConfig(
        output_dir=str(work / f"trl-{os.getpid()}"), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=p.learning_rate, weight_decay=p.weight_decay, neftune_noise_alpha=p.neftune_noise_alpha or None,
        logging_steps=10**9, save_strategy="no",
        report_to=[], seed=0, bf16=bf16, gradient_checkpointing=gc, use_liger_kernel=liger, use_cpu=not cuda,
        max_length=seq_len, packing=packing, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list([{"input_ids": ids} for ids, _ in data]),
                         processing_class=AutoTokenizer.from_pretrained(work / "tokenizer"), peft_config=peft_config(p),
                         callbacks=[timer.callback])
    result = trainer.train()
    trainable = sum(x.numel() for x in trainer.model.parameters() if x.requires_grad)
    return {"trainable_parameters": trainable, "train_loss": result.metrics.get("train_loss")}


def one_run(name: str, work: Path, tiny: bool, steps: int, warmup: int, seq_len: int) -> dict:
    """Run `name` in this process; its throughput, MFU inputs and peak memory."""
    import torch

    run = RUNS[name]
    shapes = TINY_SHAPES if tiny else SHAPES
    timer = StepTimer()
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    impl = trl_run if run[2] == "trl" else tuneline_run
    extra = impl(run, work, shapes, seq_len, warmup + steps, timer)
    tokens, seconds = timer.measured(warmup)
    model_name, method = run[0], run[1]
    n = matmul_parameters(shapes[model_name])
    flops_per_token = (6 if method == "full" else 4) * n
    result = {
        "model": model_name, "method": method, "implementation": run[2], "packing": run[3],
        "gradient_checkpointing": run[4], "liger": run[5], "batch_size": run[6], "seq_len": seq_len,
        "steps": len(timer.marks), "warmup_steps": warmup, "measured_tokens": tokens,
        "measured_seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "matmul_parameters": n, "flops_per_token": flops_per_token,
        "achieved_tflops": round(tokens / seconds * flops_per_token / 1e12, 2),
        "wall_s": round(time.perf_counter() - start, 1), **extra,
    }
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return result


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


def child(name: str, work: Path, args, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--run", name, "--work", str(work), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq-len", str(args.seq_len)] + (["--tiny"] if args.tiny else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return {"error": f"timed out after {timeout:.0f} s", "log_tail": str(err.stderr or "")[-1500:]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit code {proc.returncode}", "log_tail": (proc.stdout[-500:] + proc.stderr[-2500:])}
    return json.loads(lines[-1][len("RESULT "):])


def in_process(name: str, work: Path, args) -> dict:
    try:
        return one_run(name, work, args.tiny, args.steps, args.warmup, args.seq_len)
    except Exception as err:  # noqa: BLE001 - one failed configuration must not lose the others' results
        import traceback

        return {"error": f"{type(err).__name__}: {err}", "log_tail": traceback.format_exc()[-2500:]}


def summary(results: dict) -> dict:
    """The comparisons and targets from the runs done so far."""
    runs, peak, sheet = results["runs"], results["peak_bf16_tflops_measured"], results["peak_bf16_tflops_datasheet"]
    for r in runs.values():
        if "tokens_per_s" in r:
            r["mfu_vs_measured_peak"] = round(r["achieved_tflops"] / peak, 4) if peak else None
            r["mfu_vs_datasheet"] = round(r["achieved_tflops"] / sheet, 4) if sheet else None
    ok = {k: r for k, r in runs.items() if "tokens_per_s" in r}
    out = {}
    if "lora_0p5b" in ok:
        out["lora_0p5b_mfu"] = ok["lora_0p5b"]["mfu_vs_datasheet"]
        out["lora_0p5b_mfu_vs_measured_peak"] = ok["lora_0p5b"]["mfu_vs_measured_peak"]
        if "trl_lora_0p5b" in ok:
            out["lora_vs_trl_tokens_per_s"] = round(ok["lora_0p5b"]["tokens_per_s"] / ok["trl_lora_0p5b"]["tokens_per_s"], 3)
        for other, key in (("lora_0p5b_liger", "liger_speedup"), ("lora_0p5b_gc", "gradient_checkpointing_speed"),
                           ("lora_0p5b_unpacked", "unpacked_vs_packed_tokens_per_s")):
            if other in ok:
                out[key] = round(ok[other]["tokens_per_s"] / ok["lora_0p5b"]["tokens_per_s"], 3)
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
    head = (f"| {'run':<20} | {'tokens/s':>9} | {'TFLOP/s':>7} | {'MFU sheet':>9} | {'MFU meas.':>9} | "
            f"{'peak alloc GiB':>14} | {'reserved GiB':>12} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for name, r in results["runs"].items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {name:<20} | {r.get('error') or r.get('skipped')} |")
            continue
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {name:<20} | {r['tokens_per_s']:>9,.0f} | {r['achieved_tflops']:>7.1f} | "
                     f"{fmt(r.get('mfu_vs_datasheet'), '>9.1%'):>9} | {fmt(r.get('mfu_vs_measured_peak'), '>9.1%'):>9} | "
                     f"{fmt(r.get('peak_allocated_gib'), '>14.2f'):>14} | {fmt(r.get('peak_reserved_gib'), '>12.2f'):>12} |")
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "liger-kernel", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    parser.add_argument("--only", help="comma-separated run names (default: all, in order): " + ", ".join(RUNS))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 2 steps (CPU too): checks the script")
    parser.add_argument("--steps", type=int, help="measured steps per run (default 10; --tiny 1)")
    parser.add_argument("--warmup", type=int, help="steps run before measuring (default 3; --tiny 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 2048; --tiny 128)")
    parser.add_argument("--run-timeout", type=float, default=150, help="seconds one run may take")
    parser.add_argument("--in-process", action="store_true",
                        help="run every configuration in this process (quicker on CPU; peak memory is then not per run)")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # a child process: one run
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (1 if args.tiny else 10)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    if args.run:
        print("RESULT " + json.dumps(one_run(args.run, args.work, args.tiny, args.steps, args.warmup, args.seq_len)))
        return

    import importlib.util

    import torch

    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"bench: unknown run {unknown[0]!r}; runs are {', '.join(RUNS)}")
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    results = {
        "device": device_name, "platform": platform.platform(), "versions": versions(), "tiny": args.tiny,
        "peak_bf16_tflops_measured": measured_peak_tflops(args.tiny),
        "peak_bf16_tflops_datasheet": datasheet_tflops(device_name) if cuda else None,
        "settings": {"seq_len": args.seq_len, "steps": args.steps, "warmup_steps": args.warmup,
                     "compute_dtype": "auto (bfloat16 on a GPU that has it)", "attn_implementation": "sdpa"},
        "shapes": {k: {**v, "matmul_parameters": matmul_parameters(v)} for k, v in (TINY_SHAPES if args.tiny else SHAPES).items()},
        "runs": {},
    }
    print(f"gpu bench on {device_name}: measured bf16 peak {results['peak_bf16_tflops_measured']} TFLOP/s, "
          f"datasheet {results['peak_bf16_tflops_datasheet']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = build_tokenizer(work / "tokenizer")
        shape = (TINY_SHAPES if args.tiny else SHAPES)["0p5b"]
        model = build_random_model(shape, tokenizer.pad_token_id, "cuda" if cuda else "cpu",
                                   torch.bfloat16 if cuda else torch.float32)
        model.save_pretrained(work / "0p5b")
        tokenizer.save_pretrained(work / "0p5b")
        del model
        if cuda:
            torch.cuda.empty_cache()
        for name in names:
            needs = [m for m in (["liger_kernel"] if RUNS[name][5] else []) + (["trl", "datasets"] if RUNS[name][2] == "trl" else [])
                     + (["bitsandbytes"] if RUNS[name][1] == "qlora" else []) if importlib.util.find_spec(m) is None]
            if needs or (RUNS[name][5] and not cuda):
                results["runs"][name] = {"skipped": f"needs {', '.join(needs) or 'a GPU (Liger is Triton)'}"}
            else:
                start = time.perf_counter()
                results["runs"][name] = (in_process(name, work, args) if args.in_process
                                         else child(name, work, args, args.run_timeout))
                results["runs"][name].setdefault("wall_s", round(time.perf_counter() - start, 1))
            write(results, args.out)
            r = results["runs"][name]
            print(f"  {name}: " + (r.get("skipped") or r.get("error") or
                                   f"{r['tokens_per_s']:,.0f} tokens/s, {r['achieved_tflops']} TFLOP/s"
                                   + (f", peak {r['peak_allocated_gib']} GiB" if "peak_allocated_gib" in r else "")),
                  flush=True)
            if "error" in r:
                print("    " + r.get("log_tail", "")[-1200:].replace("\n", "\n    "), flush=True)
    write(results, args.out)
    print("\n" + table(results))
    for key, value in results["comparisons"].items():
        verdict = "" if key not in results["targets_met"] else (
            f" (target {'<=' if key.endswith('_gib') else '>='} {TARGETS[key]}: "
            f"{'met' if results['targets_met'][key] else 'NOT met'})")
        print(f"{key}: {value}{verdict}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
