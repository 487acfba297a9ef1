"""Bench the clean stage on 10,000 synthetic records: rules, embedding settings, Datalab, cold and cached
runs.

Builds 10,000 varied records (coffee and unrelated topics, English with some Chinese, and planted
faults: empty, HTML, refusal, mojibake, foreign language, PII, exact and near duplicates, label
noise), then measures
  - the rule filters in process (records/s), against a named baseline in the same run: the same
    rules with the language detector (py3langid) run on every record (no Chinese script shortcut);
  - embedding, cold, on 300 records that pass the rules, in --repeats alternating rounds (an empty
    store each time, through `embed_texts` as the stage embeds): records/s of each setting, and its
    ratio to the named baseline of the same round, the stage as it was (two texts a record, batches
    of 64 in hash order); the settings: two texts or one (`clean.embedding_text`), batches of like
    length, batch sizes 16 to 128 (`clean.batch_size`), `clean.embedding_max_seq_length` 256 or 128;
  - `python -m stages.clean` with params.yaml's settings: --stage-repeats cold runs (empty embedding
    cache), each followed by 3 cached reruns: wall time (median and min-max), CPU time, peak RSS;
  - Datalab (near_duplicate, outlier, non_iid, label) in process on the cached embeddings;
  - what one text a record changes: Datalab's rejects with two texts a record and with one on the
    first --findings-records records that pass the rules (3,000: the other way's texts are embedded
    cold), how many they share, and how many planted near-duplicate pairs and wrong categories each finds.
Targets on 2 cores: rules >= 5,000 records/s; stage cold < 180 s; cached rerun < 20 s. A verdict is
"met" (the whole spread meets the target), "parity" (the spread straddles it) or "short". The cold
stage run takes minutes, so it has fewer repeats (2 by default) than the 5 rounds of the rest.
Not measured: sentence-transformers' ONNX and OpenVINO backends. Their extras need optimum-onnx
(transformers < 4.58) and optimum-intel (transformers < 5.6); pip finds no install of either beside
transformers 5.24 (ResolutionImpossible).
Wall and CPU seconds are both reported: on a machine shared with other work, wall time
measures the neighbours as much as the code, and the load average is printed with the table.

Run:  .venv/bin/python bench/clean.py [--repeats 5] [--stage-repeats 2]   (writes bench/results/clean.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneline.common import params  # noqa: E402
from tuneline.common.params import Clean  # noqa: E402
from tuneline.common.records import content_hash, with_ids, write_jsonl_shards  # noqa: E402
from tuneline.data import rules  # noqa: E402
from tuneline.data.clean import (  # noqa: E402
    apply_rules,
    datalab_by_language,
    datalab_rejects,
    drop_exact_duplicates,
    embed_texts,
    embedded_records,
    encoder_key,
    lazy_encoder,
    load_encoder,
    record_texts,
)

N_RECORDS = 10_000
EMBED_SAMPLE = 300
TARGETS = {"rules_records_per_s": 5_000, "stage_cold_s": 180, "stage_cached_s": 20}

SUBJECTS = {
    "brewing": [
        "espresso",
        "pour-over coffee",
        "a French press",
        "cold brew",
        "a moka pot",
        "an AeroPress",
        "drip coffee",
        "Turkish coffee",
        "a siphon brewer",
        "iced coffee",
    ],
    "grinding": [
        "a burr grinder",
        "a blade grinder",
        "espresso grind size",
        "grind retention",
        "hand grinders",
    ],
    "milk": ["milk frothing", "latte art", "oat milk foam", "a cappuccino", "a flat white"],
    "beans": ["green coffee beans", "light roasts", "decaf beans", "single-origin beans", "coffee storage"],
    "baking": ["sourdough bread", "pizza dough", "croissants", "banana bread", "rye crackers"],
    "garden": ["tomato plants", "basil seedlings", "a compost heap", "rose pruning", "lawn aeration"],
    "bikes": ["a bicycle chain", "disc brakes", "tubeless tyres", "a derailleur", "saddle height"],
    "code": ["Python lists", "git branches", "SQL joins", "unit tests", "shell scripts"],
}
QUESTIONS = [
    "How do I get started with {s}?",
    "What is the most common mistake with {s}?",
    "Why does {s} give me inconsistent results?",
    "How should I look after {s} for {who}?",
    "What equipment do I need for {s}?",
    "How long does {s} take to learn for {who}?",
    "What makes {s} better on a budget?",
    "Can you explain {s} to {who}?",
]
WHO = ["a beginner", "a busy parent", "a small cafe", "a student", "an office", "a retired teacher"]
ANSWERS = [
    "Start with {n} minutes a day and keep notes on what changes.",
    "Most problems with {s} come from rushing the first step; slow down and measure.",
    "Use about {n} grams as a baseline and adjust by one step at a time.",
    "Clean everything after use, because old residue changes the result.",
    "Keep the temperature near {t} degrees and write down every change you make.",
    "A cheap scale and a timer matter more than expensive tools.",
    "Change one variable at a time so you know what helped.",
    "Ask someone experienced to watch you once; small habits are easy to miss.",
]
CHINESE = [
    ("手冲咖啡的水温应该是多少？", "一般用 90 到 96 °C 的水，刚离火的开水最合适。"),
    ("冷萃咖啡需要泡多久？", "在冰箱中浸泡 12 到 18 小时，然后过滤。"),
    ("如何清洁磨豆机？", "用刷子清理刀盘，或者使用专用的清洁颗粒，不要用水冲洗。"),
]
FOREIGN = [
    (
        "Comment conserver le café en grains ?",
        "Gardez les grains dans un récipient hermétique, à l'abri de la lumière.",
    ),
    (
        "Wie lange sollte eine French Press ziehen?",
        "Etwa vier Minuten, dann langsam drücken und sofort ausgießen.",
    ),
    (
        "¿Cómo se prepara un buen café de olla?",
        "Hierve el agua con canela y piloncillo, añade el café y deja reposar.",
    ),
]


def synthetic_records(n: int, seed: int = 0) -> tuple[list[dict], dict[str, set[str]]]:
    """`n` varied records with planted faults, the same for the same seed, and the ids of the planted
    near duplicates (`near_duplicate`, each with its twin: {id, twin id}) and wrong categories (`label`)."""
    rng = random.Random(seed)
    sources = ["seed"] * 5 + ["crawl"] * 20 + ["dataset:faq"] * 10 + ["generated"] * 65
    records: list[dict] = []
    twins: list[tuple[int, int]] = []
    mislabelled_rows: list[int] = []
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
        mislabelled = False
        if rng.random() < 0.5:
            record["category"] = category if rng.random() > 0.02 else rng.choice(sorted(SUBJECTS))
            mislabelled = record["category"] != category
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
            record["output"] += (
                f" Questions: mail help{i}@example.com or call +1 555 {rng.randint(100, 999)} 0199."
            )
        elif fault < 0.19 and records:
            twin = rng.choice(records)
            record = {**twin, "instruction": twin["instruction"].upper(), "source": "generated"}
        elif fault < 0.22 and records:
            j = rng.randrange(len(records))
            twin = records[j]
            twins.append((i, j))
            record = {**twin, "output": twin["output"].replace(".", "!", 1), "source": "generated"}
        elif mislabelled:
            mislabelled_rows.append(i)
        records.append(record)
    # Ids as the crawl and augment stages give them: an identical copy gets a copy number.
    records = with_ids(records)
    planted = {
        "near_duplicate": {frozenset({records[i]["id"], records[j]["id"]}) for i, j in twins},
        "label": {records[i]["id"] for i in mislabelled_rows},
    }
    return records, planted


# The stage runs as DVC runs it, and reports its own peak RSS and CPU time on its last stderr line.
RUN_STAGE = (
    "import resource, runpy, sys; runpy.run_module('stages.clean', run_name='__main__'); "
    "u = resource.getrusage(resource.RUSAGE_SELF); print('usage', u.ru_maxrss, u.ru_utime + u.ru_stime, "
    "file=sys.stderr)"
)


def run_stage(work: Path) -> tuple[float, float, float, str]:
    """Run the clean stage in `work`; return wall seconds, CPU seconds, peak RSS in MiB and its stdout."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUN_STAGE],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=1800,
    )
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


def spread(values: list[float]) -> dict:
    """The median and min-max of a figure's repeats."""
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "repeats": len(values),
    }


def verdict_under(values: list[float], target: float) -> str:
    """met: the whole spread is under the target; parity: the spread straddles it; short: none of it is."""
    return "met" if max(values) < target else "parity" if min(values) < target else "short"


def embed_in_hash_order(texts: list[str], encode, key: str, batch_size: int) -> None:
    """The named baseline: distinct texts in batches in hash order, as the stage embedded before
    length-sorted batches (a batch pads to its longest text, and in hash order that is a long one)."""
    distinct = sorted({content_hash(key, t): t for t in texts}.items())
    for start in range(0, len(distinct), batch_size):
        encode([t for _, t in distinct[start : start + batch_size]])


def embedding_variants(p: Clean, sample: list[dict], repeats: int, work: Path) -> dict:
    """records/s of each encoder setting on `sample`, cold (an empty store each time), in alternating
    rounds."""
    variants = {  # name: (texts, batch size, max_seq_length, hash order)
        "separate, hash order, batch 64 (before)": ("separate", 64, 256, True),
        "separate, shortest first, batch 64": ("separate", 64, 256, False),
        **{f"joined, shortest first, batch {b}": ("joined", b, 256, False) for b in (16, 32, 64, 128)},
        "joined, shortest first, batch 64, max_seq_length 128": ("joined", 64, 128, False),
    }
    encoders = {name: load_encoder(p.embedding_model, b, n) for name, (_, b, n, _) in variants.items()}
    for encode in encoders.values():
        encode(["warm up"])  # model loading is not embedding
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats):
        for name, (how, batch, max_len, hash_order) in variants.items():
            texts, key = record_texts(sample, how), encoder_key(p.embedding_model, max_len)
            store = work / f"variant-{round_}-{len(seconds[name])}-{abs(hash(name))}.sqlite"
            with Timer() as t:
                if hash_order:
                    embed_in_hash_order(texts, encoders[name], key, batch)
                else:
                    embed_texts(texts, encoders[name], store, key, batch)
            seconds[name].append(t.wall)
            print(f"  round {round_ + 1}: {name}: {rate(len(sample), t.wall)} records/s", flush=True)
    before = seconds["separate, hash order, batch 64 (before)"]
    return {
        name: {
            "texts_per_record": 1 if how == "joined" else 2,
            "batch_size": batch,
            "max_seq_length": max_len,
            "records_per_s": spread([len(sample) / s for s in seconds[name]]),
            # each round's ratio against the baseline of the same round
            "speedup_vs_before": spread([b / s for b, s in zip(before, seconds[name])]),
        }
        for name, (how, batch, max_len, _) in variants.items()
    }


def stored(encode, store: Path, key: str, batch_size: int):
    """texts -> vectors through the embedding store, as the stage embeds."""
    return lambda texts: embed_texts(texts, encode, store, key, batch_size)[0]


def findings_by_text(records: list[dict], p: Clean, store: Path, planted: dict[str, set]) -> dict:
    """Datalab's rejects with one text a record and with two, on the same records, and the planted
    faults each finds (a planted near-duplicate pair counts when one of the two is a near_duplicate
    reject)."""
    out, rejected = {}, {}
    for how in ("separate", "joined"):
        q = dataclasses.replace(p, embedding_text=how)
        encode = lazy_encoder(q.embedding_model, q.batch_size, q.embedding_max_seq_length)
        key = encoder_key(q.embedding_model, q.embedding_max_seq_length)
        _, rejects, _, _ = datalab_by_language(records, q, stored(encode, store, key, q.batch_size))
        rejected[how] = {(r["id"], r["reason"]) for r in rejects}
        by_reason = Counter(r["reason"] for r in rejects)
        twins = {r["id"] for r in rejects if r["reason"] == "near_duplicate"}
        labels = {r["id"] for r in rejects if r["reason"] == "label"}
        ids = {r["id"] for r in records}
        pairs = [pair for pair in planted["near_duplicate"] if pair <= ids]
        flips = [i for i in planted["label"] if i in ids]
        out[how] = {
            "rejects_by_reason": dict(sorted(by_reason.items())),
            "planted_near_duplicate_pairs_found": f"{sum(1 for pair in pairs if pair & twins)}/{len(pairs)}",
            "planted_wrong_categories_found": f"{sum(1 for i in flips if i in labels)}/{len(flips)}",
        }
    both = rejected["separate"] & rejected["joined"]
    out["same_rejects"] = {
        reason: sum(1 for _, r in both if r == reason) for reason in ("near_duplicate", "outlier", "label")
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds of the embedding variants")
    parser.add_argument(
        "--stage-repeats", type=int, default=2, help="cold stage runs, each followed by 3 cached runs"
    )
    parser.add_argument(
        "--findings-records", type=int, default=3_000, help="records compared with one text and two"
    )
    args = parser.parse_args()
    p = params.section("clean", path=ROOT / "params.yaml")
    records, planted = synthetic_records(N_RECORDS)
    loads = [os.getloadavg()[0]]

    apply_rules(records[:100], p)  # py3langid loads its model on first use
    with Timer() as rules_t:
        passed, _, _, _ = apply_rules(records, p)
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
        write_jsonl_shards(
            work / data["base"]["augmented_dir"] / "records", records, data["base"]["shard_records"]
        )
        store = work / data["base"]["cache_dir"] / "embeddings" / "embeddings.sqlite"

        print(f"embedding variants, {EMBED_SAMPLE} records, {args.repeats} alternating rounds:", flush=True)
        variants = embedding_variants(p, passed[:EMBED_SAMPLE], args.repeats, work)
        loads.append(os.getloadavg()[0])

        cold, cached = [], []
        for i in range(args.stage_repeats):
            store.unlink(missing_ok=True)
            cold.append(run_stage(work))
            print(f"  stage cold run {i + 1}: {cold[-1][0]:.1f} s", flush=True)
            for _ in range(3):
                cached.append(run_stage(work))
                print(f"  stage cached run: {cached[-1][0]:.1f} s", flush=True)
        loads.append(os.getloadavg()[0])
        metrics = json.loads((work / data["base"]["metrics_dir"] / "clean.json").read_text(encoding="utf-8"))

        encode = lazy_encoder(p.embedding_model, p.batch_size, p.embedding_max_seq_length)
        key = encoder_key(p.embedding_model, p.embedding_max_seq_length)
        with Timer() as cache_t:
            features = embedded_records(passed, p.embedding_text, stored(encode, store, key, p.batch_size))
        with Timer() as datalab_t:
            datalab_rejects(passed, features, p)
        print(
            "Datalab's findings with two texts a record and with one (embeds the other way too):", flush=True
        )
        findings = findings_by_text(passed[: args.findings_records], p, store, planted)
    loads.append(os.getloadavg()[0])

    rows = [
        ("rules, detector on every record (baseline)", baseline_n, baseline_t.wall, baseline_t.cpu),
        ("rules + exact duplicates (ours)", len(records), rules_t.wall, rules_t.cpu),
        (f"embedding, from cache ({p.embedding_text} texts)", len(passed), cache_t.wall, cache_t.cpu),
        ("Datalab: near_duplicate, outlier, non_iid, label", len(passed), datalab_t.wall, datalab_t.cpu),
    ]
    print(
        f"\n{N_RECORDS} synthetic records; {len(passed)} pass the rules; {os.cpu_count()} CPUs, "
        f"load average (1 min) {min(loads):.1f}-{max(loads):.1f}"
    )
    print(f"{'step':52} {'records':>8} {'wall s':>8} {'rec/s':>9} {'CPU s':>8} {'rec/CPU s':>10}")
    for name, n, wall, cpu in rows:
        print(f"{name:52} {n:8d} {wall:8.2f} {rate(n, wall):9.1f} {cpu:8.2f} {rate(n, cpu):10.1f}")
    print(f"\nembedding, cold, {EMBED_SAMPLE} records: median (min-max) of {args.repeats} rounds")
    for name, v in variants.items():
        r, x = v["records_per_s"], v["speedup_vs_before"]
        print(
            f"  {name:56} {r['median']:7.1f} ({r['min']:.1f}-{r['max']:.1f}) records/s; "
            f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f}x) the before"
        )
    stage = {"cold_s": spread([c[0] for c in cold]), "cached_s": spread([c[0] for c in cached])}
    verdicts = {
        "stage_cold_s": verdict_under([c[0] for c in cold], TARGETS["stage_cold_s"]),
        "stage_cached_s": verdict_under([c[0] for c in cached], TARGETS["stage_cached_s"]),
        "rules_records_per_s": "met"
        if rate(len(records), rules_t.wall) >= TARGETS["rules_records_per_s"]
        else "short",
    }
    print(
        f"\nstage ({p.embedding_text} texts, batch {p.batch_size}, max_seq_length "
        f"{p.embedding_max_seq_length}):"
    )
    for name, runs, target in (("cold_s", cold, "stage_cold_s"), ("cached_s", cached, "stage_cached_s")):
        s_ = stage[name]
        print(
            f"  {name}: median {s_['median']} s ({s_['min']}-{s_['max']}, {len(runs)} runs; peak RSS "
            f"{max(r[2] for r in runs):.0f} MiB); target < {TARGETS[target]} s: {verdicts[target]}"
        )
    print(f"  {cold[0][3].strip().splitlines()[0]}")
    print(f"rules: target >= {TARGETS['rules_records_per_s']} records/s: {verdicts['rules_records_per_s']}")
    print("\nfindings, separate vs joined texts:", json.dumps(findings, indent=1))

    def step(n: int, t: Timer) -> dict:
        return {
            "records": n,
            "wall_s": round(t.wall, 3),
            "records_per_s": rate(n, t.wall),
            "cpu_s": round(t.cpu, 3),
            "records_per_cpu_s": rate(n, t.cpu),
        }

    result = {
        "records": N_RECORDS,
        "records_after_rules": len(passed),
        "load_average_1min": {"min": round(min(loads), 2), "max": round(max(loads), 2)},
        "cpus": os.cpu_count(),
        "settings": {
            "embedding_text": p.embedding_text,
            "batch_size": p.batch_size,
            "embedding_max_seq_length": p.embedding_max_seq_length,
        },
        "rejects_by_reason": metrics["rejects_by_reason"],
        "baseline_rules_detector_every_record": step(baseline_n, baseline_t),
        "rules": step(len(records), rules_t),
        "embedding_variants": {"records": EMBED_SAMPLE, **variants},
        "embedding_cached": step(len(passed), cache_t),
        "datalab": step(len(passed), datalab_t),
        "findings_separate_vs_joined": {"records": min(args.findings_records, len(passed)), **findings},
        "stage": {
            **stage,
            "cold_cpu_s": spread([c[1] for c in cold]),
            "cached_cpu_s": spread([c[1] for c in cached]),
            "peak_rss_mib": {
                "cold": round(max(c[2] for c in cold)),
                "cached": round(max(c[2] for c in cached)),
            },
            "stdout_cold": cold[0][3].strip(),
            "stdout_cached": cached[0][3].strip(),
        },
        "targets": TARGETS,
        "verdicts": verdicts,
    }
    out = ROOT / "bench" / "results" / "clean.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
