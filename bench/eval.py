"""Bench the evaluate stage's generation on the default's trained model: batched greedy decoding against one
prompt at a time.

The model is the default pipeline's own fine-tuned model, the one the evaluate stage scores and
the export stage writes: by default this bench builds it by running the real stages, `dvc repro
export`, in a temporary git repository copy of this checkout (tests/pipeline_repo.make_repo; the
pipeline part of `make run`, which the README times at 4.5 minutes on 2 cores; 28 minutes here at
load average 5), and reads it from that copy's models/export (merged weights, and the
tokenizer with the chat template training used). `--model DIR` takes an exported model directory
instead (e.g. this checkout's models/export after `make run`) and builds nothing.

That model has learnt to end its answers with its end-of-turn token, so answers stop at different
lengths and a batch runs as long as its longest answer: batching's real case, not a random model
that never stops. It generates answers to 64 prompts made from the seed records with
`tuneline.eval.scoring.generate_ids`, the code the evaluate and select stages run, at batch sizes 1 (the
named baseline: one at a time), 8 (evaluate.batch_size) and 16, with evaluate.max_new_tokens.
Only tokens a sequence really produced count: up to and including its first stop token, never
the padding a finished row gets while the rest of its batch runs on. Every mode uses the same stop
tokens, and the table shows how many answers stopped at EOS and how many equal the one-at-a-time
answers, so the modes do the same work.

Each speedup (tokens/s batched over tokens/s one at a time) is taken within one round, the modes
run in turn in each round; the figure is the median of --repeats rounds (5) with the min-max
spread, and the verdict against the target (>= 3x on CPU) is "met" (the whole spread meets it),
"parity" (the spread straddles it) or "short".

Torch runs on one thread by default (--threads): on a small shared machine, OpenMP threads
that spin while a neighbour holds the other core made every figure 10-100x slower and noisy.

Run:  .venv/bin/python bench/eval.py [--model models/export] [--repeats 5]   (writes bench/results/eval.json)
"""

from __future__ import annotations

import os
import sys

# The project root replaces this script's folder on the path, so `tuneline` imports from this checkout.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from tests.pipeline_repo import make_repo, repro  # noqa: E402
from tuneline.common import params  # noqa: E402
from tuneline.common.records import read_json, read_jsonl  # noqa: E402
from tuneline.eval.scoring import generate_ids  # noqa: E402
from tuneline.model.generation import stop_ids  # noqa: E402
from tuneline.model.modeling import load_model, load_tokenizer  # noqa: E402

PROMPTS = 64
BATCH_SIZES = (1, 8, 16)  # 1 is the baseline
TARGET_SPEEDUP = 3.0


def build_trained_model(repo: Path) -> tuple[Path, float]:
    """Run the default pipeline up to `export` in a copy of this checkout at `repo`; the exported
    model's directory and the seconds it took."""
    start = time.perf_counter()
    make_repo(repo)
    repro(repo, "export")
    return repo / "models" / "export", time.perf_counter() - start


def spread(values: list[float]) -> dict:
    """The median and min-max of a ratio's rounds, and the verdict against TARGET_SPEEDUP."""
    low, high = min(values), max(values)
    verdict = "met" if low >= TARGET_SPEEDUP else "parity" if high >= TARGET_SPEEDUP else "short"
    return {
        "median": round(statistics.median(values), 2),
        "min": round(low, 2),
        "max": round(high, 2),
        "verdict": verdict,
    }


def measure(
    model, tokenizer, prompts: list[dict], max_new_tokens: int, repeats: int
) -> tuple[list[dict], dict]:
    """(one row per batch size with its answers' counts and seconds per round, speedup spread per batched
    size)."""
    stops = stop_ids(model, tokenizer, "auto")
    generate_ids(model, tokenizer, prompts[:2], "auto", 2, 4)  # warm-up: first-call allocations
    seconds: dict[int, list[float]] = {b: [] for b in BATCH_SIZES}
    answers: dict[int, list[list[int]]] = {}
    for round_ in range(repeats):
        for batch_size in BATCH_SIZES:
            start = time.perf_counter()
            answers[batch_size] = generate_ids(model, tokenizer, prompts, "auto", batch_size, max_new_tokens)
            seconds[batch_size].append(time.perf_counter() - start)
        print(
            f"  round {round_ + 1}: " + ", ".join(f"batch {b} {seconds[b][-1]:.2f} s" for b in BATCH_SIZES),
            flush=True,
        )
    baseline = answers[1]
    rows = []
    for batch_size in BATCH_SIZES:
        tokens = sum(len(a) for a in answers[batch_size])
        rows.append(
            {
                "mode": "one at a time (baseline)" if batch_size == 1 else f"batched {batch_size}",
                "batch_size": batch_size,
                "seconds": [round(s, 3) for s in seconds[batch_size]],
                "tokens": tokens,
                "tokens_per_s_median": round(tokens / statistics.median(seconds[batch_size]), 1),
                "stopped_at_eos": sum(1 for a in answers[batch_size] if a and a[-1] in stops),
                "answer_lengths": {
                    "min": min(map(len, answers[batch_size])),
                    "max": max(map(len, answers[batch_size])),
                },
                "same_answers_as_baseline": sum(
                    a == b for a, b in zip(answers[batch_size], baseline, strict=True)
                ),
            }
        )
    base_tokens = rows[0]["tokens"]
    speedups = {
        # tokens/s batched over tokens/s one at a time, within each round
        f"batch_{row['batch_size']}": spread(
            [(row["tokens"] / s) / (base_tokens / b) for s, b in zip(seconds[row["batch_size"]], seconds[1])]
        )
        for row in rows[1:]
    }
    return rows, speedups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", type=Path, help="an exported model directory (models/export); default: build it"
    )
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds; each speedup is their median")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for every mode")
    args = ap.parse_args()
    base, evaluate = params.load("base", "evaluate", path=ROOT / "params.yaml")
    seeds = read_jsonl(ROOT / base.seeds)
    prompts = [seeds[i % len(seeds)] for i in range(PROMPTS)]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, built_s = args.model, None
        if model_dir is None:
            print(
                "building the default's trained model: dvc repro export in a copy of this checkout",
                flush=True,
            )
            model_dir, built_s = build_trained_model(Path(tmp) / "repo")
            print(f"  built in {built_s:.0f} s", flush=True)
        selected = (
            read_json(model_dir.parent / "tuning_base.json")
            if (model_dir.parent / "tuning_base.json").exists()
            else {}
        )
        torch.set_num_threads(args.threads)
        tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{model_dir}: {n_params / 1e6:.2f}M parameters (base {selected.get('name', '?')}); {PROMPTS} "
            f"prompts, "
            f"max_new_tokens {evaluate.max_new_tokens}, torch threads {torch.get_num_threads()}, "
            f"{args.repeats} rounds"
        )
        loads = [os.getloadavg()[0]]
        rows, speedups = measure(model, tokenizer, prompts, evaluate.max_new_tokens, args.repeats)
        loads.append(os.getloadavg()[0])

    print()
    print(
        "| mode | median s | tokens | tokens/s (median) | stopped at EOS | answer tokens | same answers as "
        "baseline |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lengths = r["answer_lengths"]
        print(
            f"| {r['mode']} | {statistics.median(r['seconds']):.2f} | {r['tokens']} | "
            f"{r['tokens_per_s_median']:.1f} | "
            f"{r['stopped_at_eos']}/{PROMPTS} | {lengths['min']}-{lengths['max']} | "
            f"{r['same_answers_as_baseline']}/{PROMPTS} |"
        )
    print(f"\nload average (1 min) {min(loads):.1f}-{max(loads):.1f}")
    for key, s in speedups.items():
        print(
            f"speedup {key.replace('_', ' ')}: {s['median']:.2f}x (spread {s['min']:.2f}-{s['max']:.2f}x "
            f"over "
            f"{args.repeats} rounds; target >= {TARGET_SPEEDUP}x): {s['verdict']}"
        )

    out = ROOT / "bench" / "results" / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bench": "evaluate generation throughput (tuneline.eval.scoring.generate_ids, greedy)",
                "baseline": "one at a time (batch 1), same model, same round",
                "model": {
                    "source": "given (--model)"
                    if built_s is None
                    else "built: dvc repro export in a copy of this checkout",
                    "base": selected.get("name"),
                    "parameters": n_params,
                    "build_seconds": built_s and round(built_s),
                },
                "prompts": PROMPTS,
                "max_new_tokens": evaluate.max_new_tokens,
                "repeats": args.repeats,
                "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
                "torch_threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "load_average_1min": {"min": round(min(loads), 2), "max": round(max(loads), 2)},
                "rows": rows,
                "speedups": speedups,
                "target_speedup": TARGET_SPEEDUP,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
