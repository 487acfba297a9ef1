"""Bench the clean stage on 10,000 synthetic records: rules, embedding, Datalab, cold and cached runs.

Builds 10,000 varied records (coffee and unrelated topics, English with some Chinese, and planted
faults: empty, HTML, refusal, mojibake, foreign language, PII, exact and near duplicates, label
noise), then measures
  - the rule filters in process (records/s), against a named baseline in the same run: the same
    rules with the language detector (py3langid) run on every record (no Chinese script shortcut);
  - embedding, cold, on a 1,000-record sample (records/s; two texts per record);
  - `python -m stages.clean` cold (empty embedding cache) and rerun (cache warm): wall time and
    peak RSS of the stage process;
  - Datalab (near_duplicate, outlier, non_iid, label) in process on the cached embeddings.
Targets on 2 cores: rules >= 1,500 records/s (the language detector reads every non-Chinese record); whole stage < 180 s; cached rerun < 20 s.
Wall and CPU seconds are both reported: on a machine shared with other work, wall time
measures the neighbours as much as the code, and the load average is printed with the table.

Run:  .venv/bin/python bench/clean.py   (writes bench/results/clean.json)
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneline import params, rules  # noqa: E402
from tuneline.clean import (  # noqa: E402
    apply_rules,
    datalab_rejects,
    drop_exact_duplicates,
    embed_texts,
    lazy_encoder,
    model_key,
    output_text,
    prompt_text,
    record_features,
)
from tuneline.records import with_id, write_jsonl  # noqa: E402

N_RECORDS = 10_000
EMBED_SAMPLE = 1_000
TARGETS = {"rules_records_per_s": 5_000, "stage_cold_s": 180, "stage_cached_s": 20}

SUBJECTS = {
    "brewing": ["espresso", "pour-over coffee", "a French press", "cold brew", "a moka pot", "an AeroPress",
                "drip coffee", "Turkish coffee", "a siphon brewer", "iced coffee"],
    "grinding": ["a burr grinder", "a blade grinder", "espresso grind size", "grind retention", "hand grinders"],
    "milk": ["milk frothing", "latte art", "oat milk foam", "a cappuccino", "a flat white"],
    "beans": ["green coffee beans", "light roasts", "decaf beans", "single-origin beans", "coffee storage"],
    "baking": ["sourdough bread", "pizza dough", "croissants", "banana bread", "rye crackers"],
    "garden": ["tomato plants", "basil seedlings", "a compost heap", "rose pruning", "lawn aeration"],
    "bikes": ["a bicycle chain", "disc brakes", "tubeless tyres", "a derailleur", "saddle height"],
    "code": ["Python lists", "git branches", "SQL joins", "unit tests", "shell scripts"],
}  # fmt: skip
QUESTIONS = ["How do I get started with {s}?", "What is the most common mistake with {s}?",
             "Why does {s} give me inconsistent results?", "How should I look after {s} for {who}?",
             "What equipment do I need for {s}?", "How long does {s} take to learn for {who}?",
             "What makes {s} better on a budget?", "Can you explain {s} to {who}?"]  # fmt: skip
WHO = ["a beginner", "a busy parent", "a small cafe", "a student", "an office", "a retired teacher"]
ANSWERS = ["Start with {n} minutes a day and keep notes on what changes.", "Most problems with {s} come from rushing "
           "the first step; slow down and measure.", "Use about {n} grams as a baseline and adjust by one step at a time.",
           "Clean everything after use, because old residue changes the result.", "Keep the temperature near {t} "
           "degrees and write down every change you make.", "A cheap scale and a timer matter more than expensive tools.",
           "Change one variable at a time so you know what helped.", "Ask someone experienced to watch you once; "
           "small habits are easy to miss."]  # fmt: skip
CHINESE = [("手冲咖啡的水温应该是多少？", "一般用 90 到 96 °C 的水，刚离火的开水最合适。"),
           ("冷萃咖啡需要泡多久？", "在冰箱中浸泡 12 到 18 小时，然后过滤。"),
           ("如何清洁磨豆机？", "用刷子清理刀盘，或者使用专用的清洁颗粒，不要用水冲洗。")]  # fmt: skip
FOREIGN = [("Comment conserver le café en grains ?", "Gardez les grains dans un récipient hermétique, à l'abri de la lumière."),
           ("Wie lange sollte eine French Press ziehen?", "Etwa vier Minuten, dann langsam drücken und sofort ausgießen."),
           ("¿Cómo se prepara un buen café de olla?", "Hierve el agua con canela y piloncillo, añade el café y deja reposar.")]  # fmt: skip


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """`n` varied records with planted faults, the same for the same seed."""
    rng = random.Random(seed)
    sources = ["seed"] * 5 + ["crawl"] * 20 + ["dataset:faq"] * 10 + ["generated"] * 65
    records: list[dict] = []
    while len(records) < n:
        i = len(records)
        category = rng.choice(sorted(SUBJECTS))
        subject = rng.choice(SUBJECTS[category])
        values = {"s": subject, "who": rng.choice(WHO), "n": rng.randint(2, 90), "t": rng.randint(60, 98)}
        record = {
            "instruction": rng.choice(QUESTIONS).format(**values) + f" (case {i})",
            "input": "",
            "output": " ".join(rng.sample(ANSWERS, 3)).format(**values),
            "source": rng.choice(sources),
        }
        if rng.random() < 0.5:
            record["category"] = category if rng.random() > 0.02 else rng.choice(sorted(SUBJECTS))
        fault = rng.random()
        if fault < 0.03:
            record["output"] = "   "
        elif fault < 0.05:
            record["output"] = f"<p>{record['output']}</p>&nbsp;"
        elif fault < 0.06:
            record["output"] = "As an AI language model, I cannot do that."
        elif fault < 0.07:
            record["output"] = record["output"].replace("e", "Ã©", 3)
        elif fault < 0.09:
            record["instruction"], record["output"] = rng.choice(FOREIGN)
            record["instruction"] += f" ({i})"
        elif fault < 0.14:
            record["instruction"], record["output"] = rng.choice(CHINESE)
            record["instruction"] += f"（{i}）"
        elif fault < 0.16:
            record["output"] += f" Questions: mail help{i}@example.com or call +1 555 {rng.randint(100, 999)} 0199."
        elif fault < 0.19 and records:
            twin = rng.choice(records)
            record = {**twin, "instruction": twin["instruction"].upper(), "source": "generated"}
        elif fault < 0.22 and records:
            twin = rng.choice(records)
            record = {**twin, "output": twin["output"].replace(".", "!", 1), "source": "generated"}
        records.append(with_id(record))
    return records


# The stage runs as DVC runs it, and reports its own peak RSS and CPU time on its last stderr line.
RUN_STAGE = (
    "import resource, runpy, sys; runpy.run_module('stages.clean', run_name='__main__'); "
    "u = resource.getrusage(resource.RUSAGE_SELF); print('usage', u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr)"
)


def run_stage(work: Path) -> tuple[float, float, float, str]:
    """Run the clean stage in `work`; return wall seconds, CPU seconds, peak RSS in MiB and its stdout."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUN_STAGE], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1800)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"clean stage failed:\n{proc.stderr[-3000:]}")
    _, peak_kib, cpu = proc.stderr.strip().splitlines()[-1].split()
    return wall, float(cpu), int(peak_kib) / 1024, proc.stdout


class Timer:
    """Wall and CPU seconds of a block (CPU: all threads of this process, so torch's too)."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def main() -> None:
    p = params.section("clean", path=ROOT / "params.yaml")
    records = synthetic_records(N_RECORDS)

    apply_rules(records[:100], p)  # py3langid loads its model on first use
    with Timer() as rules_t:
        passed, _, _ = apply_rules(records, p)
        passed, _ = drop_exact_duplicates(passed)
    baseline_n = 2_000
    script_language = rules._script_language
    rules._script_language = lambda text: None  # baseline: the detector decides every record
    with Timer() as baseline_t:
        apply_rules(records[:baseline_n], p)
    rules._script_language = script_language

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        (work / "params.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
        write_jsonl(work / data["base"]["augmented_dir"] / "records.jsonl", records)
        store = work / data["base"]["cache_dir"] / "embeddings" / "embeddings.sqlite"

        encoder = lazy_encoder(p.embedding_model, p.batch_size)
        sample = passed[:EMBED_SAMPLE]
        encoder(["warm up"])  # model loading is not embedding
        sample_texts = [prompt_text(r) for r in sample] + [output_text(r) for r in sample]
        with Timer() as embed_t:
            _, encoded = embed_texts(sample_texts, encoder, work / "sample.sqlite", model_key(p.embedding_model), p.batch_size)

        cold_s, cold_cpu, cold_rss, cold_out = run_stage(work)
        warm_s, warm_cpu, warm_rss, warm_out = run_stage(work)
        metrics = json.loads((work / data["base"]["metrics_dir"] / "clean.json").read_text(encoding="utf-8"))

        key = model_key(p.embedding_model)
        with Timer() as cache_t:
            prompts, _ = embed_texts([prompt_text(r) for r in passed], encoder, store, key, p.batch_size)
            outputs, _ = embed_texts([output_text(r) for r in passed], encoder, store, key, p.batch_size)
        with Timer() as datalab_t:
            datalab_rejects(passed, record_features(prompts, outputs), p)
    load = os.getloadavg()[0]

    rows = [
        ("rules, detector on every record (baseline)", baseline_n, baseline_t.wall, baseline_t.cpu),
        ("rules + exact duplicates (ours)", len(records), rules_t.wall, rules_t.cpu),
        (f"embedding, cold ({encoded} texts)", len(sample), embed_t.wall, embed_t.cpu),
        (f"embedding, from cache ({2 * len(passed)} texts)", len(passed), cache_t.wall, cache_t.cpu),
        ("Datalab: near_duplicate, outlier, non_iid, label", len(passed), datalab_t.wall, datalab_t.cpu),
        ("stage, cold cache", len(records), cold_s, cold_cpu),
        ("stage, cached rerun", len(records), warm_s, warm_cpu),
    ]
    print(f"{N_RECORDS} synthetic records; {len(passed)} pass the rules; {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'step':52} {'records':>8} {'wall s':>8} {'rec/s':>9} {'CPU s':>8} {'rec/CPU s':>10}")
    for name, n, wall, cpu in rows:
        print(f"{name:52} {n:8d} {wall:8.2f} {rate(n, wall):9.1f} {cpu:8.2f} {rate(n, cpu):10.1f}")
    print(f"peak RSS of the stage process: cold {cold_rss:.0f} MiB, cached {warm_rss:.0f} MiB")
    print(f"stage: {cold_out.strip().splitlines()[0]}")
    met = {
        "rules_records_per_s": rate(len(records), rules_t.wall) >= TARGETS["rules_records_per_s"],
        "stage_cold_s": cold_s < TARGETS["stage_cold_s"],
        "stage_cached_s": warm_s < TARGETS["stage_cached_s"],
    }
    for target, ok in met.items():
        print(f"target {target} {TARGETS[target]}: {'met' if ok else 'NOT met'}")

    def step(n: int, t: Timer) -> dict:
        return {"records": n, "wall_s": round(t.wall, 3), "records_per_s": rate(n, t.wall),
                "cpu_s": round(t.cpu, 3), "records_per_cpu_s": rate(n, t.cpu)}  # fmt: skip

    result = {
        "records": N_RECORDS,
        "records_after_rules": len(passed),
        "load_average_1min": round(load, 2),
        "cpus": os.cpu_count(),
        "rejects_by_reason": metrics["rejects_by_reason"],
        "baseline_rules_detector_every_record": step(baseline_n, baseline_t),
        "rules": step(len(records), rules_t),
        "embedding_cold": {**step(len(sample), embed_t), "texts": encoded},
        "embedding_cached": step(len(passed), cache_t),
        "datalab": step(len(passed), datalab_t),
        "stage_cold": {"wall_s": round(cold_s, 2), "cpu_s": round(cold_cpu, 2), "peak_rss_mib": round(cold_rss),
                       "stdout": cold_out.strip()},
        "stage_cached": {"wall_s": round(warm_s, 2), "cpu_s": round(warm_cpu, 2), "peak_rss_mib": round(warm_rss),
                         "stdout": warm_out.strip()},
        "targets": TARGETS,
        "targets_met": met,
    }  # fmt: skip
    out = ROOT / "bench" / "results" / "clean.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
