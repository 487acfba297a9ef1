"""Bench the training loss's peak memory against the number of answer tokens at a real vocabulary.

Builds, from a config, a 2-layer Qwen2 model with Qwen2.5's vocabulary size (151,936 words, hidden
256, tied embeddings: a model whose head, not its decoder, weighs), wraps it for LoRA through
`tuneline.model.training.prepare_model` (the train stage's code), and runs one forward and backward pass
of a batch of 4 rows whose answers hold --answers tokens in all, in one process per run, so each
peak is its own. Three ways to make the loss:

- own: the model's own forward (logits of every position, prompt included);
- before: the answer-only head of commit 1558630 (the head on answer positions only, all at once);
- chunked: this commit's `chunked_cross_entropy`, LOSS_CHUNK answer positions at a time.

Reported per run: the peak RSS growth of the forward and backward pass (peak RSS, reset before the
pass, minus the RSS before it) and the loss, which the three must agree on. Timing is not measured.

Run:  .venv/bin/python bench/head_memory.py [--answers 1024 2048 4096]
      (writes bench/results/head_memory.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the project, not bench/ (whose dvc.py would shadow the dvc package)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, HIDDEN, ROWS, PROMPT = 151_936, 256, 4, 64
WAYS = ("own", "before", "chunked")


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def build_model(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        use_cache=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)


def before_loss(head, rows, targets, chunk):
    """The loss of the answer-only head of commit 1558630: every answer position's logits at once."""
    import torch

    return torch.nn.functional.cross_entropy(head(rows).float(), targets, reduction="sum")


def child(model_dir: str, way: str, answers: int) -> dict:
    """One forward and backward pass; the peak RSS growth it took and its loss."""
    import dataclasses

    import torch

    from tuneline.common import params
    from tuneline.model import training

    if way == "before":
        training.chunked_cross_entropy = before_loss
    if way == "own":
        training.answer_only_head = lambda model: False
    p = dataclasses.replace(
        params.section("train", path=ROOT / "params.yaml"),
        method="lora",
        lora_r=16,
        lora_alpha=32,
        compute_dtype="float32",
    )
    model = training.prepare_model({"model": model_dir}, p, seed=0)
    per_row = answers // ROWS
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (ROWS, PROMPT + per_row))
    labels = input_ids.clone()
    labels[
        :, : PROMPT + 1
    ] = -100  # the prompt, and the answer's first token (its predecessor is the prompt's)
    labels[:, PROMPT] = input_ids[:, PROMPT]
    before = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the RSS now
    loss = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels).loss
    loss.backward()
    return {
        "peak_growth_mb": round(rss_mb("VmHWM") - before, 1),
        "loss": round(float(loss), 5),
        "answer_tokens": int((labels[:, 1:] != -100).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "WAY", "ANSWERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return

    from tuneline.model.training import LOSS_CHUNK

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp))
        for answers in args.answers:
            for way in WAYS:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", tmp, way, str(answers)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                runs.append({"way": way, **json.loads(out.strip().splitlines()[-1])})
                print(
                    f"{answers:>6} answer tokens  {way:<8} peak growth {runs[-1]['peak_growth_mb']:>8,.0f} "
                    f"MB  "
                    f"loss {runs[-1]['loss']}",
                    flush=True,
                )
    results = {
        "device": f"CPU ({os.cpu_count()} cores)",
        "platform": platform.platform(),
        "model": {
            "arch": "qwen2",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "layers": 2,
            "rows": ROWS,
            "prompt_tokens_per_row": PROMPT,
            "method": "lora r16",
            "dtype": "float32",
        },
        "loss_chunk": LOSS_CHUNK,
        "baseline": "before: the answer-only head of commit 1558630",
        "runs": runs,
        "memory_measure": "peak RSS growth over one forward + backward pass (VmHWM reset before it)",
    }
    out = ROOT / "bench" / "results" / "head_memory.json"
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"| answer tokens | {' | '.join(WAYS)} |  (peak growth, MB)")
    by = {(r["answer_tokens"], r["way"]): r["peak_growth_mb"] for r in runs}
    for n in sorted({r["answer_tokens"] for r in runs}):
        print(f"| {n:>13} | " + " | ".join(f"{by[(n, w)]:>7,.0f}" for w in WAYS) + " |")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
