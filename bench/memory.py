"""Bench QLoRA's peak memory against full fine-tuning on a model where weights, not activations, weigh.

bench/train.py compares them on a 24M-parameter model, where activations and the framework
dominate the peak and QLoRA's saving hardly shows (0.80x). This builds, from a config, a
Llama-style model of about 120M parameters (hidden 1024, 10 layers, GQA 16/8 heads, vocab 2048,
the models stage's offline tokenizer) and runs one training process per method through
bench/train.py's child mode (`tuneline.model.training.train`, the train stage's code, params.yaml's train
settings except LoRA rank 16 / alpha 32, usual at this size, where the tiny default's rank 128 would
make the adapter a fifth of the model; the rendered seed records, batch --batch-size). Each run is its own
process, so its peak
is its own; the runs alternate qlora, full, qlora, full, ... so a drift of the machine touches both.

Reported per run: weights as stored (4-bit ones packed), the training state (weights + a gradient
and AdamW's two moments per trainable parameter: exact, from the model), peak RSS, its growth over
the RSS before the model was loaded, and the rest of that growth (activations, autograd and
framework workspace). The ratio is qlora's peak RSS growth over full's: median of --repeats pairs
with the min-max spread; the verdict is "met" (whole spread under the target), "parity" (the
spread straddles it) or "short". Target (issue 18): <= 0.6.

Run:  .venv/bin/python bench/memory.py [--repeats 5] [--steps 1] [--batch-size 4]
      (writes bench/results/memory.json)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ (this script's directory, first on sys.path) holds dvc.py, which would shadow the dvc package
# that dvclive imports; the project root stands in its place
sys.path[0] = str(ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# bench/train.py, whose child mode runs one training process (loaded from its file: bench/ is not a
# package, and putting it on sys.path would let bench/dvc.py shadow the dvc package)
_spec = importlib.util.spec_from_file_location("train_bench", ROOT / "bench" / "train.py")
train_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_bench)

MODEL = dict(
    arch="llama",
    hidden_size=1024,
    intermediate_size=2752,
    num_layers=10,
    num_heads=16,
    num_kv_heads=8,
    max_positions=1024,
    chat_template="llama3",
    pretrain_steps=0,
)
TARGET = 0.6
METHODS = ("tuneline_qlora", "tuneline_full")


def build_model(out_dir: Path) -> int:
    from stages.models import tokenizer_texts
    from tuneline.common import params
    from tuneline.common.params import TinyModel
    from tuneline.model.tinymodels import save_tiny_model

    base, models = params.load("base", "models", path=ROOT / "params.yaml")
    texts = tokenizer_texts(str(ROOT / base.seeds), str(ROOT / base.site_dir))
    return save_tiny_model(TinyModel(**MODEL), texts, models.vocab_size, base.seed, out_dir)


def verdict(values: list[float], target: float) -> str:
    if max(values) <= target:
        return "met"
    return "parity" if min(values) <= target else "short"


LORA = {"BENCH_LORA_R": "16", "BENCH_LORA_ALPHA": "32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="qlora/full pairs; the ratio is their median")
    parser.add_argument(
        "--steps", type=int, default=1, help="measured optimizer steps per run (after one warm-up)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    child = argparse.Namespace(steps=args.steps, warmup=1, batch_size=args.batch_size)
    os.environ.update(LORA)  # the child processes read them (bench/train.py's settings)

    load_before = os.getloadavg()[0]
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        parameters = build_model(model_dir)
        for i in range(args.repeats):
            runs = {
                name: train_bench.result_of(name, train_bench.launch(name, model_dir, child, None))
                for name in METHODS
            }
            for r in runs.values():
                r["rest_mb"] = round(r["peak_rss_growth_mb"] - r["state_mb"], 1)
            value = train_bench.ratio(
                runs["tuneline_qlora"]["peak_rss_growth_mb"], runs["tuneline_full"]["peak_rss_growth_mb"]
            )
            pairs.append({"ratio": value, "runs": runs})
            print(
                f"  repeat {i + 1}: qlora/full peak RSS growth {value}  "
                + ", ".join(f"{n} {r['peak_rss_growth_mb']:,.0f} MB" for n, r in runs.items()),
                flush=True,
            )

    ratios = [p["ratio"] for p in pairs]
    median = round(statistics.median(ratios), 3)
    state = pairs[0]["runs"]
    results = {
        "device": f"CPU ({os.cpu_count()} cores)",
        "platform": platform.platform(),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "model": {**MODEL, "parameters": parameters},
        "settings": {
            "lora_r": int(LORA["BENCH_LORA_R"]),
            "lora_alpha": int(LORA["BENCH_LORA_ALPHA"]),
            "batch_size": args.batch_size,
            "measured_steps": args.steps,
            "warmup_steps": 1,
            "repeats": args.repeats,
        },
        "memory_measure": "peak_rss_growth_mb (peak RSS minus RSS before the model was loaded)",
        "pairs": pairs,
        "qlora_vs_full_peak_memory": {"median": median, "min": min(ratios), "max": max(ratios)},
        "qlora_vs_full_training_state": train_bench.ratio(
            state["tuneline_qlora"]["state_mb"], state["tuneline_full"]["state_mb"]
        ),
        "target": TARGET,
        "verdict": verdict(ratios, TARGET),
    }
    out = ROOT / "bench" / "results" / "memory.json"
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    print(
        f"\nmemory bench: {parameters / 1e6:.0f}M-parameter Llama-style model, batch {args.batch_size}, "
        f"{args.repeats} alternating pairs; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        f"| {'run (first repeat)':<16} | {'weights MB':>10} | {'state MB':>8} | {'rest MB':>8} "
        f"| {'peak RSS MB':>11} | {'growth MB':>9} |"
    )
    print(f"|{'-' * 18}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 13}|{'-' * 11}|")
    for name, r in state.items():
        print(
            f"| {name:<16} | {r['weights_mb']:>10,.1f} | {r['state_mb']:>8,.1f} | {r['rest_mb']:>8,.1f} "
            f"| {r['peak_rss_mb']:>11,.0f} | {r['peak_rss_growth_mb']:>9,.0f} |"
        )
    print(
        f"qlora/full peak RSS growth: median {median} (min {min(ratios)}, max {max(ratios)}) over "
        f"{args.repeats} "
        f"pairs; target <= {TARGET}: {results['verdict']}"
    )


if __name__ == "__main__":
    main()
