"""Bench the evaluate stage's generation: batched greedy decoding against one prompt at a time.

Generates answers to 64 prompts made from the seed records with `tuneline.scoring.generate_ids`,
the code the evaluate and select stages run, at batch sizes 1 (the named baseline: one at a
time), 8 and 16, with evaluate.max_new_tokens, on the default `tiny_qwen` of params.yaml
(models.tiny; about 3.4M parameters, ChatML) in two states:
  - as built: the random model the default pipeline starts from; no answer ends before
    max_new_tokens, so every row of a batch does useful work to the end;
  - taught to stop: the same model after a short full fine-tune on the seeds, which ends most
    answers after a few tokens and lets a few run to the limit: the worst case for batching,
    where a batch runs as long as its longest answer.

Only tokens a sequence really produced count: up to and including its first stop token, never
the padding a finished row gets while the rest of its batch runs on. Every mode uses the same
stop tokens, and the table shows how many answers stopped at EOS and how many equal the
one-at-a-time answers, so the modes do the same work. Target on CPU: batched >= 3x the
tokens/s of one at a time (on the model as built, which is what the default pipeline evaluates).

Torch runs on one thread by default (--threads): on a small shared machine, OpenMP threads
that spin while a neighbour holds the other core made every figure 10-100x slower and noisy.

Run:  .venv/bin/python bench/eval.py [--repeats 2]   (writes bench/results/eval.json)
"""

from __future__ import annotations

import os
import sys

# The project root replaces this script's folder on the path, so `tuneline` imports from this checkout.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from stages.models import tokenizer_texts as corpus  # noqa: E402
from tuneline import params  # noqa: E402
from tuneline.modeling import load_model, load_tokenizer  # noqa: E402
from tuneline.records import read_jsonl  # noqa: E402
from tuneline.scoring import generate_ids, stop_ids  # noqa: E402
from tuneline.tinymodels import save_tiny_model  # noqa: E402
from tuneline.tokenization import collate, encode  # noqa: E402

PROMPTS = 64
BATCH_SIZES = (1, 8, 16)  # 1 is the baseline
TARGET_SPEEDUP = 3.0


def build_model(out_dir: Path) -> int:
    """The default tiny_qwen, built as the models stage builds it; return its parameter count."""
    base, models = params.load("base", "models", path=ROOT / "params.yaml")
    texts = corpus(str(ROOT / base.seeds), str(ROOT / base.site_dir))
    return save_tiny_model(models.tiny["tiny_qwen"], texts, models.vocab_size, base.seed, out_dir)


def teach_to_stop(model, tokenizer, records: list[dict], steps: int, seed: int) -> float:
    """Full fine-tuning steps on the records (each answer ends with the end-of-turn token); the last loss."""
    torch.manual_seed(seed)
    examples = []
    for r in records:
        ids, labels = encode(tokenizer, r, "auto", train_on_prompt=False)
        examples.append({"input_ids": ids, "labels": labels})
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3)
    model.train()
    loss = float("nan")
    for step in range(steps):
        start = (step * 8) % len(examples)
        batch = collate((examples + examples)[start : start + 8], tokenizer.pad_token_id)
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.detach().item()
    model.eval()
    return loss


def run_mode(model, tokenizer, prompts: list[dict], batch_size: int, max_new_tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    """The best wall time of `repeats` runs and the answers' token ids."""
    best, answers = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        answers = generate_ids(model, tokenizer, prompts, "auto", batch_size, max_new_tokens)
        best = min(best, time.perf_counter() - start)
    return best, answers


def scenario(name: str, model, tokenizer, prompts: list[dict], max_new_tokens: int, repeats: int) -> list[dict]:
    """One row per batch size; speedup is tokens/s against batch 1 on the same model."""
    stops = stop_ids(model, tokenizer)
    generate_ids(model, tokenizer, prompts[:2], "auto", 2, 4)  # warm-up: first-call allocations
    rows, baseline = [], []
    for batch_size in BATCH_SIZES:
        seconds, answers = run_mode(model, tokenizer, prompts, batch_size, max_new_tokens, repeats)
        baseline = baseline or answers
        tokens = sum(len(a) for a in answers)
        rows.append({
            "scenario": name,
            "mode": "one at a time (baseline)" if batch_size == 1 else f"batched {batch_size}",
            "batch_size": batch_size,
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "stopped_at_eos": sum(1 for a in answers if a and a[-1] in stops),
            "same_answers_as_baseline": sum(a == b for a, b in zip(answers, baseline, strict=True)),
            "speedup": round((tokens / seconds) / rows[0]["tokens_per_s"], 2) if rows else 1.0,
        })
        print(f"  {name}, {rows[-1]['mode']}: {rows[-1]['tokens_per_s']} tokens/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode; the fastest counts")
    ap.add_argument("--train-steps", type=int, default=120, help="fine-tuning steps of the `taught to stop` model")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for every mode")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, evaluate = params.load("base", "evaluate", path=ROOT / "params.yaml")
    seeds = read_jsonl(ROOT / base.seeds)
    prompts = [seeds[i % len(seeds)] for i in range(PROMPTS)]

    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(Path(tmp) / "tiny_qwen")
        tokenizer, model = load_tokenizer(str(Path(tmp) / "tiny_qwen")), load_model(str(Path(tmp) / "tiny_qwen"))
    print(f"tiny_qwen: {n_params / 1e6:.2f}M parameters; {PROMPTS} prompts, max_new_tokens {evaluate.max_new_tokens}, "
          f"torch threads {torch.get_num_threads()}")
    rows = scenario("as built", model, tokenizer, prompts, evaluate.max_new_tokens, args.repeats)
    start = time.perf_counter()
    loss = teach_to_stop(model, tokenizer, seeds, args.train_steps, base.seed)
    print(f"taught to stop: {args.train_steps} fine-tuning steps in {time.perf_counter() - start:.1f} s (loss {loss:.3f})")
    rows += scenario("taught to stop", model, tokenizer, prompts, evaluate.max_new_tokens, args.repeats)

    print()
    print("| model | mode | seconds | tokens | tokens/s | stopped at EOS | same answers as baseline | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['mode']} | {r['seconds']:.2f} | {r['tokens']} | {r['tokens_per_s']:.1f} | "
              f"{r['stopped_at_eos']}/{PROMPTS} | {r['same_answers_as_baseline']}/{PROMPTS} | {r['speedup']:.2f}x |")
    best = max(r["speedup"] for r in rows if r["scenario"] == "as built" and r["batch_size"] > 1)
    print(f"\nbest batched speedup on the model as built: {best:.2f}x (target >= {TARGET_SPEEDUP}x): "
          f"{'met' if best >= TARGET_SPEEDUP else 'NOT met'}")

    out = ROOT / "bench" / "results" / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "evaluate generation throughput (tuneline.scoring.generate_ids, greedy)",
        "baseline": "one at a time (batch 1), same model",
        "model": {"name": "tiny_qwen", "parameters": n_params, "taught_to_stop_steps": args.train_steps},
        "prompts": PROMPTS, "max_new_tokens": evaluate.max_new_tokens, "repeats": args.repeats,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "rows": rows, "target_speedup": TARGET_SPEEDUP, "best_speedup_as_built": best, "target_met": best >= TARGET_SPEEDUP,
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
