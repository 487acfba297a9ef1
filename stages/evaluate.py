"""Score the selected base model and the fine-tuned model on the test split.

Reads:  base.alpaca_dir/test.json, base.selected, base.adapter_dir (adapter and tokenizer with the
        chat template training used), `evaluate:`.
Writes: base.metrics_dir/eval.json (base, tuned and delta for each metric: git-tracked, so
        `dvc metrics diff` shows the effect of a change), base.metrics_dir/eval_samples.md
        (side by side answers), base.metrics_dir/eval/records.jsonl (per-record scores, for `dvc plots`).
Run:    python -m stages.evaluate
"""

from __future__ import annotations

from pathlib import Path

from tuneline import params
from tuneline.modeling import load_base, load_tokenizer, load_tuned, trained_4bit
from tuneline.records import read_json, write_json, write_jsonl
from tuneline.scoring import score

REPORTED = ("loss", "perplexity", "rouge_1", "rouge_2", "rouge_l", "bleu", "exact_match")


def compare(base_m: dict, tuned_m: dict) -> dict:
    """The flat metrics file: base, tuned and delta (tuned - base) of each metric."""
    out = {"base": {}, "tuned": {}, "delta": {}}
    for key in REPORTED:
        if key in base_m and key in tuned_m:
            out["base"][key] = round(base_m[key], 6)
            out["tuned"][key] = round(tuned_m[key], 6)
            out["delta"][key] = round(tuned_m[key] - base_m[key], 6)
    out["records"] = base_m["records"]
    return out


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:200]


def samples_table(records: list[dict], base_rows: list[dict], tuned_rows: list[dict], n: int) -> str:
    lines = ["# Evaluation samples (test split, greedy decoding)", "",
             "| instruction | reference | base answer | tuned answer |", "|---|---|---|---|"]
    for record, b, t in list(zip(records, base_rows, tuned_rows))[:n]:
        lines.append(f"| {cell(record['instruction'])} | {cell(record['output'])} | {cell(b.get('answer', ''))} | {cell(t.get('answer', ''))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    base, p = params.load("base", "evaluate")
    selected = read_json(base.selected)
    metrics_dir = Path(base.metrics_dir)
    if selected["kind"] == "api":
        print(f"evaluate: skipped, the chosen model {selected['name']} is an API model used as is (see select_table.md)")
        write_json(metrics_dir / "eval.json", {"skipped": 1})
        (metrics_dir / "eval_samples.md").write_text("Skipped: an API model was chosen; see select_table.md\n", encoding="utf-8")
        write_jsonl(metrics_dir / "eval" / "records.jsonl", [])
        return

    records = read_json(Path(base.alpaca_dir) / "test.json")
    tokenizer = load_tokenizer(base.adapter_dir)  # carries the chat template training used
    args = dict(template="auto", batch_size=p.batch_size, max_new_tokens=p.max_new_tokens, generation_samples=p.generation_samples)

    # A QLoRA run is compared with the 4-bit base it trained over: the delta is the adapter's alone.
    base_model = load_base(selected, p.dtype, quantize_4bit=trained_4bit(base.adapter_dir) and not p.merge)
    base_m, base_rows = score(base_model, tokenizer, records, **args)
    del base_model
    tuned_model = load_tuned(selected, base.adapter_dir, merge=p.merge, dtype=p.dtype)
    tuned_m, tuned_rows = score(tuned_model, tokenizer, records, **args)

    result = compare(base_m, tuned_m)
    write_json(metrics_dir / "eval.json", result)
    (metrics_dir / "eval_samples.md").write_text(samples_table(records, base_rows, tuned_rows, p.samples_in_report), encoding="utf-8")
    rows = [{"index": b["index"], "id": b["id"], "base_loss": round(b["loss"], 6), "tuned_loss": round(t["loss"], 6),
             **{f"tuned_{k}": round(t[k], 6) for k in ("rouge_l", "bleu") if k in t}} for b, t in zip(base_rows, tuned_rows)]
    write_jsonl(metrics_dir / "eval" / "records.jsonl", rows)
    print("evaluate: " + ", ".join(f"{k} {result['base'][k]:.4f} -> {result['tuned'][k]:.4f}" for k in result["base"]))


if __name__ == "__main__":
    main()
