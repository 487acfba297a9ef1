"""Bench the tokenize stage (named so, not tokenize.py, which would shadow the standard library's
`tokenize` for every script run from bench/): records/s on 50,000 synthetic Alpaca records, and the rerun when nothing changed.

Setup: the default `tiny_qwen` is built as the models stage builds it (a fast byte-level BPE
tokenizer trained offline, vocab 2048, ChatML template); 50,000 synthetic Alpaca records (a
quarter with a system prompt, a fifth with one or two history turns, answers of 5-90 words
from the seed vocabulary, about Alpaca's lengths) go to train.json and 500 to val.json.

Measured, in one run:
- baseline: a plain Python loop calling `tokenize_example` (the stage's own map function) on every
  record, with no `datasets` around it;
- the stage (`stages.tokenize.main`: JSON read, `datasets.map`, counts, rejects, `save_to_disk`)
  with tokenize.num_proc 1 and 2;
- `dvc repro tokenize` in a temporary git + DVC repository (this project's tokenize stage from
  dvc.yaml, num_proc 2): its first run, then the rerun when nothing changed, which DVC skips after
  checking deps, params and outs.
Target: >= 2,000 records/s on 2 cores (num_proc 2).

Run:  .venv/bin/python bench/tokenize_stage.py [--records 50000]   (writes bench/results/tokenize.json)
"""

from __future__ import annotations

import os
import sys

import argparse
import contextlib
import io
import json
import platform
import random
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAL_RECORDS = 500
TARGET_RECORDS_PER_S = 2000.0


def build_model(out_dir: Path) -> None:
    from stages.models import tokenizer_texts as corpus
    from tuneline import params
    from tuneline.tinymodels import save_tiny_model

    base, models = params.load("base", "models", path=ROOT / "params.yaml")
    texts = corpus(str(ROOT / base.seeds), str(ROOT / base.site_dir))
    save_tiny_model(models.tiny["tiny_qwen"], texts, models.vocab_size, base.seed, out_dir)


def synthetic_records(n: int, seed: int) -> list[dict]:
    """`n` Alpaca records made of the seed records' words, with systems and histories mixed in."""
    from tuneline.records import read_jsonl

    seeds = read_jsonl(ROOT / "data" / "seeds" / "seeds.jsonl")
    words = sorted({w for r in seeds for w in (r["instruction"] + " " + r["output"]).split()})
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    records = []
    for i in range(n):
        history = [[text(5, 15) + "?", text(10, 40)] for _ in range(rng.choice([1, 2]))] if i % 5 == 0 else []
        records.append({
            "instruction": text(5, 20) + "?",
            "input": text(5, 30) if i % 3 == 0 else "",
            "output": text(5, 90),
            "system": text(5, 15) if i % 4 == 0 else "",
            "history": history,
            "id": f"synthetic-{i}",
        })
    return records


def make_project(root: Path, model_dir: Path, records: list[dict]) -> Path:
    """A git + DVC repository holding the code, params.yaml and a dvc.yaml with the tokenize stage only."""
    import yaml

    from tuneline import params

    project = root / "project"
    for part in ("stages", "tuneline"):
        shutil.copytree(ROOT / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", project / "params.yaml")
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    dvc_yaml = {"vars": pipeline["vars"], "stages": {"tokenize": pipeline["stages"]["tokenize"]}}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False), encoding="utf-8")
    base = params.section("base", path=project / "params.yaml")
    alpaca = project / base.alpaca_dir
    alpaca.mkdir(parents=True)
    (alpaca / "train.json").write_text(json.dumps(records[VAL_RECORDS:], ensure_ascii=False), encoding="utf-8")
    (alpaca / "val.json").write_text(json.dumps(records[:VAL_RECORDS], ensure_ascii=False), encoding="utf-8")
    (project / base.selected).parent.mkdir(parents=True, exist_ok=True)
    (project / base.selected).write_text(json.dumps({
        "name": "tiny_qwen", "kind": "local", "model": str(model_dir), "revision": None, "trust_remote_code": False,
    }), encoding="utf-8")
    return project


def set_num_proc(project: Path, num_proc: int) -> None:
    text = (project / "params.yaml").read_text(encoding="utf-8")
    text, n = re.subn(r"(?m)^(  num_proc: )\d+", rf"\g<1>{num_proc}", text)
    assert n == 1, "params.yaml has no tokenize.num_proc"
    (project / "params.yaml").write_text(text, encoding="utf-8")


def time_stage(project: Path, num_proc: int) -> float:
    """Seconds for one in-process run of the tokenize stage."""
    from stages import tokenize as stage

    set_num_proc(project, num_proc)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            stage.main()
        return time.perf_counter() - start
    finally:
        os.chdir(cwd)


def dvc(project: Path, *args: str) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}", DVC_NO_ANALYTICS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return elapsed, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from tuneline import params
    from tuneline.modeling import load_tokenizer
    from tuneline.tokenization import tokenize_example

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "model")
        records = synthetic_records(args.records + VAL_RECORDS, seed=0)[: args.records + VAL_RECORDS]
        project = make_project(root, root / "model", records)
        p = params.section("tokenize", path=project / "params.yaml")
        total = len(records)

        tokenizer = load_tokenizer(str(root / "model"))
        start = time.perf_counter()
        rows = [tokenize_example(r, tokenizer, p.template, p.max_length, p.overlong, p.train_on_prompt) for r in records]
        loop_s = time.perf_counter() - start
        tokens = sum(r["length"] for r in rows)
        del rows

        stage_s = {n: time_stage(project, n) for n in (1, 2)}
        metrics = json.loads((project / "metrics" / "tokenize.json").read_text())
        shutil.rmtree(project / "data" / "tokenized")

        # num_proc stays at 2 for the DVC runs
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        dvc(project, "init", "-q")
        first_s, _ = dvc(project, "repro", "tokenize")
        rerun_s, out = dvc(project, "repro", "tokenize")
        skipped = "didn't change, skipping" in out and "Running stage 'tokenize'" not in out
        peak_child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    rate = {n: round(total / s, 1) for n, s in stage_s.items()}
    results = {
        "records": total,
        "tokens": tokens,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        # other work on the machine slows every row alike, and num_proc 2 most of all
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "baseline_plain_loop": {"seconds": round(loop_s, 2), "records_per_s": round(total / loop_s, 1)},
        "stage_num_proc_1": {"seconds": round(stage_s[1], 2), "records_per_s": rate[1]},
        "stage_num_proc_2": {"seconds": round(stage_s[2], 2), "records_per_s": rate[2]},
        "num_proc_2_vs_1": round(rate[2] / rate[1], 2),
        "stage_vs_plain_loop": round(rate[2] / (total / loop_s), 2),
        "dvc_repro_first_run_s": round(first_s, 2),
        "dvc_repro_nothing_changed_s": round(rerun_s, 2),
        "dvc_rerun_skipped": skipped,
        "dvc_rerun_vs_first_run": round(rerun_s / first_s, 3),
        "peak_rss_of_dvc_repro_mb": round(peak_child_mb, 1),
        "stage_metrics_train": metrics["train"],
        "target_records_per_s": TARGET_RECORDS_PER_S,
        "target_met": rate[2] >= TARGET_RECORDS_PER_S,
    }
    out = ROOT / "bench" / "results" / "tokenize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    print(f"tokenize bench: {total:,} synthetic Alpaca records ({tokens:,} tokens), {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"| {'run':<42} | {'seconds':>8} | {'records/s':>10} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 12}|")
    print(f"| {'baseline: plain loop, no datasets':<42} | {loop_s:>8.2f} | {total / loop_s:>10,.0f} |")
    for n in (1, 2):
        print(f"| {f'stage, num_proc {n}':<42} | {stage_s[n]:>8.2f} | {rate[n]:>10,.0f} |")
    print(f"| {'dvc repro tokenize (first run, num_proc 2)':<42} | {first_s:>8.2f} | {total / first_s:>10,.0f} |")
    print(f"| {'dvc repro tokenize (nothing changed)':<42} | {rerun_s:>8.2f} | {'skipped' if skipped else 'RAN':>10} |")
    print(f"num_proc 2 vs 1: {results['num_proc_2_vs_1']}x; rerun/first run: {results['dvc_rerun_vs_first_run']}; "
          f"target >= {TARGET_RECORDS_PER_S:,.0f} records/s: {'met' if results['target_met'] else 'NOT met'}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
