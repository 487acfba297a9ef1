"""Choose the base model: the candidate with the best validation score by select.metric.

Reads:  base.metrics_dir/select/<name>.json for every name in select.candidates, `select:`.
Writes: base.selected (name, model, score, why, tokenizer hash), base.metrics_dir/select_table.md.
Run:    python -m stages.choose
"""

from __future__ import annotations

from pathlib import Path

from tuneline import params
from tuneline.records import read_json, tokenizer_hash, write_json

LOWER_IS_BETTER = {"loss", "perplexity"}
COLUMNS = ("loss", "perplexity", "rouge_l", "bleu", "exact_match", "prompt_tokens", "completion_tokens", "latency_per_answer_s")


def choose(scores: dict[str, dict], metric: str) -> tuple[str, str]:
    """The best candidate's name and why it was chosen."""
    missing = [name for name, s in scores.items() if s.get(metric) is None]
    if missing:
        raise SystemExit(f"choose: select.metric '{metric}' is not available for {', '.join(missing)}; pick a metric every candidate has")
    sign = 1 if metric in LOWER_IS_BETTER else -1
    # Ties (common among small untrained models) go to a local candidate, which can be
    # fine-tuned, then to the lower validation loss, then to the name, so the choice is stable.
    best = min(scores, key=lambda n: (sign * scores[n][metric], scores[n].get("kind") == "api",
                                      scores[n].get("loss") if scores[n].get("loss") is not None else float("inf"), n))
    others = ", ".join(f"{n} {scores[n][metric]:.4f}" for n in sorted(scores) if n != best)
    direction = "lowest" if metric in LOWER_IS_BETTER else "highest"
    return best, f"{direction} validation {metric}: {scores[best][metric]:.4f}" + (f" (others: {others})" if others else "")


def table(scores: dict[str, dict], best: str, why: str) -> str:
    """The comparison as a Markdown table, one row per candidate."""
    def cell(value) -> str:
        if value is None:
            return "n/a"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| candidate | kind | parameters | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 3)]
    for name in sorted(scores):
        s = scores[name]
        size = s.get("parameters", "api") if s.get("kind") == "local" else "api"
        mark = " **(chosen)**" if name == best else ""
        lines.append(f"| {name}{mark} | {s.get('kind')} | {cell(size)} | " + " | ".join(cell(s.get(c)) for c in COLUMNS) + " |")
    return "\n".join(["# Base model selection", "", *lines, "", f"Chosen: **{best}**, {why}.", ""])


def main() -> None:
    base, p = params.load("base", "select")
    scores = {name: read_json(Path(base.metrics_dir) / "select" / f"{name}.json") for name in p.candidates}
    best, why = choose(scores, p.metric)
    cand = p.candidates[best]
    write_json(base.selected, {
        "name": best, "kind": cand.kind, "model": cand.model, "revision": cand.revision,
        "trust_remote_code": cand.trust_remote_code, "base_url": cand.base_url, "api_key_env": cand.api_key_env,
        "metric": p.metric, "score": scores[best][p.metric], "why": why,
        "tokenizer_hash": tokenizer_hash(cand.model) if cand.kind == "local" else "",
    })
    Path(base.metrics_dir, "select_table.md").write_text(table(scores, best, why), encoding="utf-8")
    print(f"choose: {best} ({why})")


if __name__ == "__main__":
    main()
