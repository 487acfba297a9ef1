"""Score the base model and the fine-tuned model on two sets: unseen and seen.

`unseen` is the test split: does the tuning generalise? `seen` is a fixed sample of the training
records (the first evaluate.seen_samples of train.json): did the tuning take? The gap between them
shows over-fitting.

Reads:  base.alpaca_dir/{test,train}.json, base.tuning_base, base.adapter_dir (adapter and tokenizer with the
        chat template training used), `evaluate:`.
Writes: base.metrics_dir/eval.json (per set: base, tuned and delta for each metric, the delta's 95%
        paired bootstrap interval over the set's records (delta_ci95) and its verdict: better, worse
        or within noise; git-tracked, so `dvc metrics diff` shows the effect of a change),
        base.metrics_dir/eval_samples.md
        (side by side answers of both sets), base.metrics_dir/eval/records.jsonl (per-record scores
        and answers of the test split, for `dvc plots` and `tuneline review`),
        base.metrics_dir/eval/seen_records.jsonl (the same for seen), with evaluate.judge.enabled:
        unseen.judge in eval.json (win/tie/loss/unparsed rates of tuned over base, position
        consistency; tuneline/eval/judge.py) and base.metrics_dir/eval/judge.jsonl (per-record verdicts;
        empty when the judge is off), the judge's replies cached in base.cache_dir/judge; with
        evaluate.lm_eval_tasks: lm_eval in eval.json (each lm-evaluation-harness task's metrics for
        base and tuned, their standard errors, the delta, its interval and verdict; tuneline/eval/lmeval.py).
Run:    python -m stages.evaluate
"""

from __future__ import annotations

from pathlib import Path

from stages import run
from tuneline.common import params, timings
from tuneline.common.records import read_chosen, read_json, skipped_for_api, write_jsonl
from tuneline.eval import judge
from tuneline.eval.intervals import delta_intervals, verdict
from tuneline.eval.scoring import score
from tuneline.model.modeling import load_base, load_tokenizer, load_tuned, trained_4bit

REPORTED = ("loss", "perplexity", "rouge_1", "rouge_2", "rouge_l", "bleu", "exact_match")


def compare(base_m: dict, tuned_m: dict, intervals: dict[str, dict]) -> dict:
    """The flat metrics file: base, tuned and delta (tuned - base) of each metric, the delta's 95%
    bootstrap interval (`intervals`, from tuneline.eval.intervals) and its verdict."""
    out = {"base": {}, "tuned": {}, "delta": {}, "delta_ci95": {}, "verdict": {}}
    for key in REPORTED:
        if key in base_m and key in tuned_m:
            out["base"][key] = round(base_m[key], 6)
            out["tuned"][key] = round(tuned_m[key], 6)
            out["delta"][key] = round(tuned_m[key] - base_m[key], 6)
            if key in intervals:
                out["delta_ci95"][key] = intervals[key]
                out["verdict"][key] = verdict(key, intervals[key])
    out["records"] = base_m["records"]
    return out


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:200]


SETS = {
    "unseen": "test split: records the model never trained on",
    "seen": "training records the model was tuned on",
}


def samples_table(sets: dict[str, tuple[list[dict], list[dict], list[dict]]], n: int) -> str:
    """Base and tuned answers side by side, `n` records of each set."""
    lines = ["# Evaluation samples (greedy decoding)"]
    for name, (records, base_rows, tuned_rows) in sets.items():
        lines += [
            "",
            f"## {name} ({SETS[name]})",
            "",
            "| instruction | reference | base answer | tuned answer |",
            "|---|---|---|---|",
        ]
        for record, b, t in list(zip(records, base_rows, tuned_rows))[:n]:
            lines.append(
                f"| {cell(record['instruction'])} | {cell(record['output'])} | {cell(b.get('answer', ''))} | "
                f"{cell(t.get('answer', ''))} |"
            )
    return "\n".join(lines) + "\n"


def record_rows(base_rows: list[dict], tuned_rows: list[dict]) -> list[dict]:
    """Per-record scores for `dvc plots`: base and tuned loss, tuned ROUGE-L and BLEU where generated,
    and both answers (which `tuneline review` shows side by side)."""
    return [
        {
            "index": b["index"],
            "id": b["id"],
            "base_loss": round(b["loss"], 6),
            "tuned_loss": round(t["loss"], 6),
            **{f"tuned_{k}": round(t[k], 6) for k in ("rouge_l", "bleu") if k in t},
            **({"base_answer": b["answer"], "tuned_answer": t.get("answer", "")} if "answer" in b else {}),
        }
        for b, t in zip(base_rows, tuned_rows)
    ]


def run_judge(
    j, records: list[dict], base_rows: list[dict], tuned_rows: list[dict], cache_dir: Path, seed: int
) -> tuple[dict, list[dict]]:
    """The judge's verdicts on the records that have both answers (the first generation_samples)."""
    n = sum("answer" in r for r in tuned_rows)
    summary, rows, _ = judge.run(
        j,
        "evaluate.judge",
        records[:n],
        [r["answer"] for r in tuned_rows[:n]],
        [r["answer"] for r in base_rows[:n]],
        cache_dir,
        seed,
    )
    return summary, rows


def changes(r: dict) -> str:
    """A set's metrics, base -> tuned (verdict), on one line."""
    return ", ".join(
        f"{k} {r['base'][k]:.4f} -> {r['tuned'][k]:.4f} ({r['verdict'].get(k, 'no interval')})"
        for k in r["base"]
    )


def benchmarks(p, model, tokenizer, seed: int) -> dict[str, dict]:
    """The evaluate.lm_eval_tasks scores of `model` (none when no task is named)."""
    if not p.lm_eval_tasks:
        return {}
    from tuneline.eval import lmeval

    return lmeval.run_tasks(
        model,
        tokenizer,
        p.lm_eval_tasks,
        p.lm_eval_include_path,
        p.lm_eval_num_fewshot,
        p.lm_eval_limit,
        p.lm_eval_chat_template,
        p.batch_size,
        seed,
    )


def main() -> None:
    base, p = params.load("base", "evaluate")
    params.check_environment("evaluate", p)
    chosen = read_chosen(base.tuning_base)
    metrics_dir = Path(base.metrics_dir)
    judge_dir = Path(base.cache_dir) / "judge"
    judge_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when the judge is off
    if p.judge.enabled and not chosen.api:
        judge.preflight(p.judge, "evaluate.judge")
    msg = f"the chosen model {chosen.name} is an API model used as is (see select_table.md)"
    if skipped_for_api(
        chosen,
        "evaluate",
        msg,
        {
            metrics_dir / "eval.json": {"skipped": 1},
            metrics_dir / "eval_samples.md": "Skipped: an API model was chosen; see select_table.md\n",
            **{
                metrics_dir / "eval" / name: []
                for name in ("records.jsonl", "seen_records.jsonl", "judge.jsonl")
            },
        },
    ):
        return

    sets = {
        "unseen": read_json(Path(base.alpaca_dir) / "test.json"),
        "seen": read_json(Path(base.alpaca_dir) / "train.json")[: p.seen_samples],
    }
    tokenizer = load_tokenizer(base.adapter_dir)  # carries the chat template training used
    args = dict(
        template="auto",
        batch_size=p.batch_size,
        max_new_tokens=p.max_new_tokens,
        generation_samples=p.generation_samples,
    )

    # A QLoRA run is compared with the 4-bit base it trained over (dequantised, as the merge goes into
    # it, with evaluate.merge): the delta is the adapter's alone.
    base_model = load_base(chosen, p.dtype, quantize_4bit=trained_4bit(base.adapter_dir), dequantized=p.merge)
    base_scores = {name: score(base_model, tokenizer, records, **args) for name, records in sets.items()}
    base_bench = benchmarks(p, base_model, tokenizer, base.seed)
    del base_model
    tuned_model = load_tuned(chosen, base.adapter_dir, merge=p.merge, dtype=p.dtype)
    tuned_scores = {name: score(tuned_model, tokenizer, records, **args) for name, records in sets.items()}
    tuned_bench = benchmarks(p, tuned_model, tokenizer, base.seed)

    result = {}
    for name, records in sets.items():
        intervals = delta_intervals(
            base_scores[name][1], tuned_scores[name][1], [r["output"] for r in records], base.seed
        )
        result[name] = compare(base_scores[name][0], tuned_scores[name][0], intervals)
    if p.lm_eval_tasks:
        from tuneline.eval import lmeval

        result["lm_eval"] = lmeval.compare(base_bench, tuned_bench)
    verdicts = []
    if p.judge.enabled:
        result["unseen"]["judge"], verdicts = run_judge(
            p.judge, sets["unseen"], base_scores["unseen"][1], tuned_scores["unseen"][1], judge_dir, base.seed
        )
    write_jsonl(metrics_dir / "eval" / "judge.jsonl", verdicts)
    timings.write_metrics(metrics_dir / "eval.json", result, metrics_dir, "evaluate")
    table = {name: (records, base_scores[name][1], tuned_scores[name][1]) for name, records in sets.items()}
    (metrics_dir / "eval_samples.md").write_text(samples_table(table, p.samples_in_report), encoding="utf-8")
    write_jsonl(
        metrics_dir / "eval" / "records.jsonl",
        record_rows(base_scores["unseen"][1], tuned_scores["unseen"][1]),
    )
    write_jsonl(
        metrics_dir / "eval" / "seen_records.jsonl",
        record_rows(base_scores["seen"][1], tuned_scores["seen"][1]),
    )
    if "judge" in result["unseen"]:
        j = result["unseen"]["judge"]
        print(
            f"evaluate: judge on unseen ({j['pairs']} pairs, both orders): tuned wins {j['win']:.2f}, ties "
            f"{j['tie']:.2f}, "
            f"loses {j['loss']:.2f}, unparsed {j['unparsed']:.2f}; position consistency "
            f"{j['position_consistency']}"
        )
    for name in sets:
        print(f"evaluate: {name} ({result[name]['records']} records): {changes(result[name])}")
    if "lm_eval" in result:
        print(f"evaluate: lm_eval: {changes(result['lm_eval'])}")


if __name__ == "__main__":
    run(main)
