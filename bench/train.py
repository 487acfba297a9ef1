"""Bench fine-tuning: tokens/s and peak memory for qlora, lora and full; tuneline vs TRL; packing on vs off.

Setup: a Llama-style model of about 24M parameters built from a config (hidden 512, 8 layers,
GQA 8/4 heads) with the offline byte-level BPE tokenizer the models stage trains (vocab 2048,
Llama 3 template); the seed records (data/seeds/seeds.jsonl) rendered and label-masked by
`tuneline.tokenization` exactly as the tokenize stage does (max length from params.yaml), cycled
to fill the steps. Settings (learning rate, LoRA rank/alpha/targets, compute dtype) are params.yaml's
train section; the batch size is --batch-size (4: a few steps of a 24M model must fit in minutes
on 2 CPU cores), the same for every run.

Each run is its own process, so its peak memory is its own:
- tuneline: `tuneline.training.train` (what the train stage calls: HF Trainer + peft) with
  method qlora, lora and full, and lora on packed data (tokenize.packing: true);
- baseline: a plain TRL `SFTTrainer` script on the same model, records, chat template, max
  length, LoRA config and settings (prompt-completion conversations, completion-only loss).
Tokens/s counts non-padding tokens (the Trainer's `num_input_tokens_seen`, "non_padding") over the
steps after the warm-up ones, so packed and padded runs compare fairly ("effective tokens/s"). On
CPU the ratios use each configuration's fastest step over its repeats (a CPU shared with other
work slows some steps several fold); the mean over the measured steps and tokens per CPU-second
are reported beside it.
Peak memory: on CPU, the process's peak RSS and its growth over the RSS before the model was
loaded (the interpreter and libraries weigh the same in every run); on CUDA, peak allocated.
Targets (issue 7): tuneline >= 1.0x TRL's tokens/s; packing >= 1.5x effective tokens/s;
qlora peak memory <= 0.6x full fine-tuning's.

Run:  .venv/bin/python bench/train.py [--steps 3] [--warmup 1] [--batch-size 4] [--repeats 2]
      (writes bench/results/train.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RUNS = ("tuneline_lora", "trl_lora", "tuneline_qlora", "tuneline_full", "tuneline_lora_packed")
BENCH_MODEL = dict(arch="llama", hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                   num_kv_heads=4, max_positions=1024, chat_template="llama3")
TARGETS = {"tuneline_vs_trl_tokens_per_s": 1.0, "packing_effective_tokens_per_s": 1.5, "qlora_vs_full_peak_memory": 0.6}


def settings(batch_size: int | None = None):
    """params.yaml's base, tokenize and train sections (the train batch size replaced when given)."""
    from tuneline import params

    base, tok, p = params.load("base", "tokenize", "train", path=ROOT / "params.yaml")
    return base, tok, (dataclasses.replace(p, batch_size=batch_size) if batch_size else p)


def build_model(out_dir: Path) -> int:
    """The bench model and its offline tokenizer, built as the models stage builds the tiny ones."""
    from stages.models import corpus
    from tuneline import params
    from tuneline.params import TinyModel
    from tuneline.tinymodels import build_tiny_model

    base, models = params.load("base", "models", path=ROOT / "params.yaml")
    texts = corpus(str(ROOT / base.seeds), str(ROOT / base.site_dir))
    return build_tiny_model(TinyModel(**BENCH_MODEL), texts, models.vocab_size, base.seed, out_dir)


def seed_records() -> list[dict]:
    from tuneline.records import read_jsonl

    return read_jsonl(ROOT / "data" / "seeds" / "seeds.jsonl")


def cycled(records: list[dict], n: int) -> list[dict]:
    return [records[i % len(records)] for i in range(n)]


class StepTimer:
    """Wall time, process CPU time and non-padding tokens seen at the end of every optimizer step."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        marks = self.marks = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.append((time.perf_counter(), time.process_time(), state.num_input_tokens_seen))

        self.callback = Callback()

    def measured(self, warmup: int) -> tuple[int, float, float]:
        """Tokens, wall seconds and CPU seconds of the steps after the first `warmup`."""
        (t0, c0, n0), (t1, c1, n1) = self.marks[warmup - 1], self.marks[-1]
        return n1 - n0, t1 - t0, c1 - c0

    def best_step(self, warmup: int) -> float:
        """Tokens/s of the fastest measured step: on a machine shared with other work, the step
        least slowed by it (as `timeit` reports the best of its repeats)."""
        steps = list(zip(self.marks[warmup - 1:], self.marks[warmup:]))
        return max((n1 - n0) / (t1 - t0) for (t0, _, n0), (t1, _, n1) in steps)


def tuneline_run(model_dir: Path, method: str, packed: bool, steps: int, batch_size: int, timer: StepTimer,
                 out: Path):
    """tuneline.training.train on exactly `steps` batches of the rendered seed records; the trained model."""
    from datasets import Dataset

    from tuneline.modeling import load_tokenizer
    from tuneline.tokenization import pack_batch, tokenize_example
    from tuneline.training import train

    base, tok, p = settings(batch_size)
    p = dataclasses.replace(p, method=method, epochs=1, save_steps=10**6, logging_steps=10**6)
    tokenizer = load_tokenizer(str(model_dir))
    rows = [tokenize_example(r, tokenizer, tok.template, tok.max_length, tok.overlong, tok.train_on_prompt)
            for r in cycled(seed_records(), 40 * steps * p.batch_size)]
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows if r["input_ids"]])
    if packed:
        ds = ds.map(pack_batch, batched=True, batch_size=len(ds), fn_kwargs=dict(max_length=tok.max_length),
                    remove_columns=ds.column_names)
    ds = ds.select(range(steps * p.batch_size))  # one epoch of exactly `steps` batches
    selected = {"name": "bench", "kind": "local", "model": str(model_dir)}
    model, _, _ = train(selected, p, ds, None, out / "checkpoints", base.seed, [timer.callback])
    return model


def trl_run(model_dir: Path, steps: int, batch_size: int, timer: StepTimer, out: Path):
    """The baseline: a plain TRL SFTTrainer script with the same model, records and settings; the trained model."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tuneline.modeling import load_model, load_tokenizer
    from tuneline.templates import to_messages
    from tuneline.training import peft_config

    base, tok, p = settings(batch_size)
    p = dataclasses.replace(p, method="lora")
    tokenizer = load_tokenizer(str(model_dir))
    records = cycled(seed_records(), steps * p.batch_size)
    ds = Dataset.from_list([{"prompt": to_messages(r, with_answer=False),
                             "completion": [{"role": "assistant", "content": r["output"]}]} for r in records])
    config = SFTConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=p.batch_size, max_steps=steps,
        learning_rate=p.learning_rate, lr_scheduler_type="linear", weight_decay=p.weight_decay,
        logging_steps=10**6, save_strategy="no", report_to=[], seed=base.seed, data_seed=base.seed,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        max_length=tok.max_length, packing=False, completion_only_loss=True,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=load_model(str(model_dir)), args=config, train_dataset=ds, processing_class=tokenizer,
                         peft_config=peft_config(p), callbacks=[timer.callback])
    trainer.train()
    return trainer.model


def state_memory(model) -> dict:
    """The bytes of the training state: weights as stored (4-bit ones packed), plus a gradient and
    AdamW's two moments for every trainable parameter. Exact, and what QLoRA shrinks; activations
    and the framework are not in it."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(t.numel() * t.element_size() for t in model.parameters() if t.requires_grad)
    return {"weights_mb": round(weights / 2**20, 1), "state_mb": round((weights + 3 * trainable) / 2**20, 1)}


def one_run(name: str, model_dir: Path, steps: int, warmup: int, batch_size: int) -> dict:
    """Run `name` in this process; its throughput and peak memory."""
    import psutil
    import torch

    timer = StepTimer()
    rss_before = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as tmp:
        if name == "trl_lora":
            trained = trl_run(model_dir, warmup + steps, batch_size, timer, Path(tmp))
        else:
            method = name.split("_")[1]
            trained = tuneline_run(model_dir, method, name.endswith("_packed"), warmup + steps, batch_size, timer,
                                   Path(tmp))
    tokens, seconds, cpu_seconds = timer.measured(warmup)
    result = {
        "tokens_per_s": round(tokens / seconds, 1), "tokens_per_cpu_s": round(tokens / cpu_seconds, 1),
        "best_step_tokens_per_s": round(timer.best_step(warmup), 1),
        "measured_tokens": tokens, "measured_seconds": round(seconds, 2), "measured_cpu_seconds": round(cpu_seconds, 2),
        "steps": len(timer.marks), "warmup_steps": warmup, **state_memory(trained),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_model_mb": round(rss_before / 2**20, 1),
    }
    result["peak_rss_growth_mb"] = round(result["peak_rss_mb"] - result["rss_before_model_mb"], 1)
    if torch.cuda.is_available():
        result["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def best_of(repeats: list[dict]) -> dict:
    """The repeat with the fastest step, with the largest memory figures of all repeats."""
    best = dict(max(repeats, key=lambda r: r["best_step_tokens_per_s"]))
    for key in ("peak_rss_mb", "peak_rss_growth_mb", "peak_cuda_allocated_mb"):
        if key in best:
            best[key] = max(r[key] for r in repeats)
    best["repeats"] = repeats
    return best


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step, every run alike")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before measuring")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, taken in turn")
    parser.add_argument("--only", nargs="*", choices=RUNS, default=list(RUNS))
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # a child process: one run
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print("RESULT " + json.dumps(one_run(args.run, args.model, args.steps, args.warmup, args.batch_size)))
        return

    import torch

    load_before = os.getloadavg()[0]
    repeats: dict[str, list[dict]] = {name: [] for name in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        parameters = build_model(model_dir)
        # in turn (a b c a b c), so a stretch of heavy load on the machine does not hit one run only
        for name in [n for _ in range(args.repeats) for n in args.only]:
            start = time.perf_counter()
            child = subprocess.run([sys.executable, __file__, "--run", name, "--model", str(model_dir),
                                    "--steps", str(args.steps), "--warmup", str(args.warmup),
                                    "--batch-size", str(args.batch_size)],
                                   capture_output=True, text=True)
            lines = [l for l in child.stdout.splitlines() if l.startswith("RESULT ")]
            if child.returncode != 0 or not lines:
                raise SystemExit(f"bench run {name} failed:\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}")
            run = {**json.loads(lines[-1][len("RESULT "):]), "wall_s": round(time.perf_counter() - start, 1)}
            repeats[name].append(run)
            print(f"  {name}: best step {run['best_step_tokens_per_s']:,.0f} tokens/s, mean {run['tokens_per_s']:,.0f}, "
                  f"peak RSS {run['peak_rss_mb']:,.0f} MB ({run['wall_s']} s)", flush=True)
    runs = {name: best_of(rs) for name, rs in repeats.items()}

    cuda = torch.cuda.is_available()
    # On a CPU shared with other work, the mean over all steps mostly measures the others: the
    # fastest step is the one least slowed by them. On a GPU, the mean is the measure.
    speed = "tokens_per_s" if cuda else "best_step_tokens_per_s"
    memory = "peak_cuda_allocated_mb" if cuda else "peak_rss_growth_mb"
    get = lambda run, key: runs.get(run, {}).get(key, 0.0)  # noqa: E731
    ratios = {
        "tuneline_vs_trl_tokens_per_s": ratio(get("tuneline_lora", speed), get("trl_lora", speed)),
        "packing_effective_tokens_per_s": ratio(get("tuneline_lora_packed", speed), get("tuneline_lora", speed)),
        "qlora_vs_full_peak_memory": ratio(get("tuneline_qlora", memory), get("tuneline_full", memory)),
        "lora_vs_full_peak_memory": ratio(get("tuneline_lora", memory), get("tuneline_full", memory)),
        "qlora_vs_full_training_state": ratio(get("tuneline_qlora", "state_mb"), get("tuneline_full", "state_mb")),
        "tuneline_vs_trl_mean_tokens_per_s": ratio(get("tuneline_lora", "tokens_per_s"), get("trl_lora", "tokens_per_s")),
        "tuneline_vs_trl_tokens_per_cpu_s": ratio(get("tuneline_lora", "tokens_per_cpu_s"),
                                                  get("trl_lora", "tokens_per_cpu_s")),
    }
    met = {k: (v <= t if k.endswith("memory") else v >= t) for k, t in TARGETS.items() if (v := ratios[k]) == v}
    _, tok, p = settings(args.batch_size)
    results = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "platform": platform.platform(),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "model": {**BENCH_MODEL, "parameters": parameters},
        "settings": {"batch_size": p.batch_size, "max_length": tok.max_length, "learning_rate": p.learning_rate,
                     "lora_r": p.lora_r, "lora_alpha": p.lora_alpha, "target_modules": p.target_modules,
                     "compute_dtype": p.compute_dtype, "steps": args.steps, "warmup_steps": args.warmup,
                     "repeats": args.repeats},
        "speed_measure": speed,
        "memory_measure": memory,
        "runs": runs,
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": met,
    }
    out = ROOT / "bench" / "results" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    print(f"\ntrain bench: {parameters / 1e6:.1f}M-parameter Llama-style model on {results['device']}, "
          f"batch {p.batch_size}, {args.steps} measured steps after {args.warmup}, best of {args.repeats}; "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"| {'run':<22} | {'best step tok/s':>15} | {'mean tok/s':>10} | {'tok/CPU-s':>9} | {'peak RSS MB':>11} "
          f"| {'growth MB':>9} | {'state MB':>8} |")
    print(f"|{'-' * 24}|{'-' * 17}|{'-' * 12}|{'-' * 11}|{'-' * 13}|{'-' * 11}|{'-' * 10}|")
    for name, r in runs.items():
        print(f"| {name:<22} | {r['best_step_tokens_per_s']:>15,.0f} | {r['tokens_per_s']:>10,.0f} "
              f"| {r['tokens_per_cpu_s']:>9,.0f} | {r['peak_rss_mb']:>11,.0f} | {r['peak_rss_growth_mb']:>9,.0f} "
              f"| {r['state_mb']:>8,.1f} |")
    print(f"ratios from {speed} and {memory}:")
    for key, value in ratios.items():
        target = TARGETS.get(key)
        verdict = "" if target is None else f" (target {'<=' if key.endswith('memory') else '>='} {target}: " \
            f"{'met' if met.get(key) else 'NOT met'})"
        print(f"  {key}: {value}{verdict}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
