"""Bench the tokenize stage (named so, not tokenize.py, which would shadow the standard library's
`tokenize` for every script run from bench/): records/s on 50,000 synthetic Alpaca records, and the rerun
when nothing changed.

Setup: the default `tiny_qwen` is built as the models stage builds it (a fast byte-level BPE
tokenizer trained offline, vocab 2048, ChatML template); 50,000 synthetic Alpaca records (a
quarter with a system prompt, a fifth with one or two history turns, answers of 5-90 words
from the seed vocabulary, about Alpaca's lengths) go to train.json and 500 to val.json.

Measured, in one run, --repeats times in turn (the order rotating each repeat, so load from other
work on the machine falls on every row alike):
- baseline: a plain Python loop calling `tokenize_example` on every record, one record at a time
  (what the stage's map function did before it took batches), with no `datasets` around it;
- the stage (`stages.tokenize.main`: JSON read, batched `datasets.map`, counts, rejects,
  `save_to_disk`) with tokenize.num_proc 1 and 2;
- `dvc repro tokenize` in a temporary git + DVC repository (this project's tokenize stage from
  dvc.yaml, num_proc 2): its first run, then the rerun when nothing changed, which DVC skips after
  checking deps, params and outs.
Each figure is the median of the repeats, with the min-max spread. Target: >= 2,000 records/s on
2 cores for the stage with the faster num_proc; verdict "met" (the whole spread is above it),
"parity" (the spread straddles it) or "short".

Run:  .venv/bin/python bench/tokenize_stage.py [--records 50000] [--repeats 5]   (writes
bench/results/tokenize.json)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ (this script's directory, first on sys.path) holds dvc.py, which would shadow the dvc package
# that dvclive imports; the project root stands in its place
sys.path[0] = str(ROOT)
VAL_RECORDS = 500
TARGET_RECORDS_PER_S = 2000.0


def build_model(out_dir: Path) -> None:
    from stages.models import tokenizer_texts as corpus
    from tuneline.common import params
    from tuneline.model.tinymodels import save_tiny_model

    base, models = params.load("base", "models", path=ROOT / "params.yaml")
    texts = corpus(str(ROOT / base.seeds), str(ROOT / base.site_dir))
    save_tiny_model(models.tiny["tiny_qwen"], texts, models.vocab_size, base.seed, out_dir)


def synthetic_records(n: int, seed: int) -> list[dict]:
    """`n` Alpaca records made of the seed records' words, with systems and histories mixed in."""
    from tuneline.common.records import read_jsonl

    seeds = read_jsonl(ROOT / "data" / "seeds" / "seeds.jsonl")
    words = sorted({w for r in seeds for w in (r["instruction"] + " " + r["output"]).split()})
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    records = []
    for i in range(n):
        history = [[text(5, 15) + "?", text(10, 40)] for _ in range(rng.choice([1, 2]))] if i % 5 == 0 else []
        records.append(
            {
                "instruction": text(5, 20) + "?",
                "input": text(5, 30) if i % 3 == 0 else "",
                "output": text(5, 90),
                "system": text(5, 15) if i % 4 == 0 else "",
                "history": history,
                "id": f"synthetic-{i}",
            }
        )
    return records


def make_project(root: Path, model_dir: Path, records: list[dict]) -> Path:
    """A git + DVC repository holding the code, params.yaml and a dvc.yaml with the tokenize stage only."""
    import yaml

    from tuneline.common import params

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
    (alpaca / "train.json").write_text(
        json.dumps(records[VAL_RECORDS:], ensure_ascii=False), encoding="utf-8"
    )
    (alpaca / "val.json").write_text(json.dumps(records[:VAL_RECORDS], ensure_ascii=False), encoding="utf-8")
    chosen = json.dumps(
        {
            "name": "tiny_qwen",
            "kind": "local",
            "model": str(model_dir),
            "revision": None,
            "trust_remote_code": False,
        }
    )
    (project / base.selected).parent.mkdir(parents=True, exist_ok=True)
    (project / base.selected).write_text(chosen, encoding="utf-8")
    (project / base.tuning_base).write_text(
        chosen, encoding="utf-8"
    )  # what tokenize reads: pretraining, off, hands it on
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
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        DVC_NO_ANALYTICS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    start = time.perf_counter()
    result = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return elapsed, result.stdout + result.stderr


def verdict(low: float, high: float, target: float) -> str:
    """met: the whole spread reaches the target; parity: the spread straddles it; short: none of it does."""
    return "met" if low >= target else "parity" if high >= target else "short"


def summary(rates: list[float]) -> dict:
    return {
        "median": round(statistics.median(rates), 1),
        "min": round(min(rates), 1),
        "max": round(max(rates), 1),
        "repeats": [round(r, 1) for r in rates],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from tuneline.common import params
    from tuneline.model.modeling import load_tokenizer
    from tuneline.model.tokenization import tokenize_example

    load_before = os.getloadavg()[0]
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "model")
        records = synthetic_records(args.records + VAL_RECORDS, seed=0)[: args.records + VAL_RECORDS]
        project = make_project(root, root / "model", records)
        p = params.section("tokenize", path=project / "params.yaml")
        total = len(records)
        tokenizer = load_tokenizer(str(root / "model"))
        tokens = 0

        def plain_loop() -> float:
            nonlocal tokens
            start = time.perf_counter()
            rows = [
                tokenize_example(r, tokenizer, p.template, p.max_length, p.overlong, p.train_on_prompt)
                for r in records
            ]
            seconds = time.perf_counter() - start
            tokens = sum(r["length"] for r in rows)
            return seconds

        runs = {
            "baseline_plain_loop": plain_loop,
            "stage_num_proc_1": lambda: time_stage(project, 1),
            "stage_num_proc_2": lambda: time_stage(project, 2),
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                seconds[name].append(runs[name]())
                loads.append(os.getloadavg()[0])
            print(
                f"  repeat {repeat + 1}: "
                + ", ".join(f"{n} {total / s[-1]:,.0f} records/s" for n, s in seconds.items())
                + f"; load average {loads[-1]:.1f}",
                flush=True,
            )
        metrics = json.loads((project / "metrics" / "tokenize.json").read_text())
        shutil.rmtree(project / "data" / "tokenized")

        # num_proc stays at 2 for the DVC runs
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        dvc(project, "init", "-q")
        first_s, _ = dvc(project, "repro", "tokenize")
        rerun_s, out = dvc(project, "repro", "tokenize")
        skipped = "didn't change, skipping" in out and "Running stage 'tokenize'" not in out
        peak_child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    rates = {name: summary([total / s for s in secs]) for name, secs in seconds.items()}
    best = max(("stage_num_proc_1", "stage_num_proc_2"), key=lambda n: rates[n]["median"])

    # ratios repeat by repeat (the runs of one repeat saw the same machine), then their median and spread
    def ratio(a: str, b: str) -> dict:
        return summary([sb / sa for sa, sb in zip(seconds[a], seconds[b])])

    results = {
        "records": total,
        "tokens": tokens,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        # other work on the machine slows every row; the repeats rotate so that it falls on all of them
        "load_average_1m": {
            "before": round(load_before, 2),
            "median_after_each_run": round(statistics.median(loads), 2),
            "max": round(max(loads), 2),
        },
        "repeats": args.repeats,
        "records_per_s": rates,
        "num_proc_2_vs_1": ratio("stage_num_proc_2", "stage_num_proc_1"),
        "stage_vs_plain_loop": ratio(best, "baseline_plain_loop"),
        "faster_num_proc": int(best[-1]),
        "dvc_repro_first_run_s": round(first_s, 2),
        "dvc_repro_nothing_changed_s": round(rerun_s, 2),
        "dvc_rerun_skipped": skipped,
        "dvc_rerun_vs_first_run": round(rerun_s / first_s, 3),
        "peak_rss_of_dvc_repro_mb": round(peak_child_mb, 1),
        "stage_metrics_train": metrics["train"],
        "target_records_per_s": TARGET_RECORDS_PER_S,
        "verdict": verdict(rates[best]["min"], rates[best]["max"], TARGET_RECORDS_PER_S),
    }
    out = ROOT / "bench" / "results" / "tokenize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    print(
        f"tokenize bench: {total:,} synthetic Alpaca records ({tokens:,} tokens), {os.cpu_count()} CPUs, "
        f"{args.repeats} rotating repeats, load average {load_before:.1f} before, median "
        f"{statistics.median(loads):.1f}"
    )
    print(f"| {'run':<42} | {'records/s (median)':>18} | {'min-max':>15} |")
    print(f"|{'-' * 44}|{'-' * 20}|{'-' * 17}|")
    for name, r in rates.items():
        print(f"| {name:<42} | {r['median']:>18,.0f} | {r['min']:>7,.0f}-{r['max']:<7,.0f} |")
    print(f"| {'dvc repro tokenize (first run, num_proc 2)':<42} | {total / first_s:>18,.0f} | {'':>15} |")
    print(
        f"| {'dvc repro tokenize (nothing changed)':<42} | "
        f"{('skipped' if skipped else 'RAN') + f' {rerun_s:.1f} s':>18} | {'':>15} |"
    )
    for key in ("num_proc_2_vs_1", "stage_vs_plain_loop"):
        r = results[key]
        print(f"{key}: {r['median']}x (spread {r['min']}-{r['max']})")
    print(f"target >= {TARGET_RECORDS_PER_S:,.0f} records/s ({best}): {results['verdict']}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
