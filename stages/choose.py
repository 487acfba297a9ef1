"""Choose the base model: the candidate with the best validation score by select.metric; when that
score lies within another candidate's 95% bootstrap interval, select.tie_break decides among them.

Reads:  base.metrics_dir/select/<name>.json for every name in select.candidates, `select:`.
Writes: base.selected (name, model, score, why, the candidates it tied with, tokenizer hash),
        base.metrics_dir/select_table.md (with each candidate's cost and its metric's interval).
Run:    python -m stages.choose
"""

from __future__ import annotations

from pathlib import Path

from stages import run
from tuneline.common import params
from tuneline.common.records import read_json, tokenizer_hash, write_json

LOWER_IS_BETTER = {"loss", "perplexity"}
# judge: the LLM judge's win rate over the reference answers (select.judge.enabled), higher is better.
# An API candidate's latency is a timing: in base.metrics_dir/timings/select-<name>.json, not here.
COLUMNS = (
    "loss",
    "perplexity",
    "rouge_l",
    "bleu",
    "exact_match",
    "judge",
    "prompt_tokens",
    "completion_tokens",
    "cost",
)


def ranked(scores: dict[str, dict], metric: str) -> list[str]:
    """Candidate names, best first by `metric`. Exact ties go to a local candidate, which can be
    fine-tuned, then to the lower validation loss, then to the name, so the order is stable."""
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return sorted(
        scores,
        key=lambda n: (
            sign * scores[n][metric],
            scores[n].get("kind") == "api",
            scores[n].get("loss") if scores[n].get("loss") is not None else float("inf"),
            n,
        ),
    )


def within_noise(best: float, other: dict, metric: str) -> bool:
    """True when the best score lies inside `other`'s 95% interval (or equals its score): the
    validation records cannot tell the two apart."""
    if other[metric] == best:
        return True
    interval = (other.get("ci95") or {}).get(metric)
    if interval is None:
        return False
    return best >= interval["low"] if metric in LOWER_IS_BETTER else best <= interval["high"]


def tie_key(name: str, s: dict, tie_break: str, listed: list[str]) -> float:
    """What select.tie_break ranks tied candidates by, smallest first. An API model's size is unknown
    (it ranks last by size); a local model costs no API fees (0 by cost)."""
    if tie_break == "smaller_model":
        return s.get("parameters") if s.get("kind") == "local" else float("inf")
    if tie_break == "lower_cost":
        return s.get("cost") or 0.0
    return listed.index(name)


def choose(
    scores: dict[str, dict], metric: str, tie_break: str = "listed_order"
) -> tuple[str, str, list[str]]:
    """The chosen candidate's name, why, and the candidates it was tied with (within noise).

    The best-scoring candidate wins unless its score lies inside another candidate's 95% bootstrap
    interval: then the scores are a tie and `tie_break` (smaller_model, lower_cost, listed_order)
    picks among the tied ones, the better score deciding what the tie-break leaves equal.
    """
    missing = [name for name, s in scores.items() if s.get(metric) is None]
    if missing:
        fix = " (rerun select with select.judge.enabled: true)" if metric == "judge" else ""
        raise params.ParamsError(
            f"choose: select.metric '{metric}' is not available for {', '.join(missing)}; pick a metric "
            f"every candidate has{fix}"
        )
    order = ranked(scores, metric)
    top = scores[order[0]][metric]
    tied = [order[0]] + [n for n in order[1:] if within_noise(top, scores[n], metric)]
    listed = list(scores)
    best = min(tied, key=lambda n: (tie_key(n, scores[n], tie_break, listed), order.index(n)))

    def shown(n: str) -> str:
        interval = (scores[n].get("ci95") or {}).get(metric)
        return f"{scores[n][metric]:.4f}" + (
            f" [{interval['low']:.4f}, {interval['high']:.4f}]" if interval else ""
        )

    direction = "lowest" if metric in LOWER_IS_BETTER else "highest"
    others = ", ".join(f"{n} {shown(n)}" for n in order if n != order[0])
    why = f"{direction} validation {metric}: {order[0]} {shown(order[0])}" + (
        f" (others: {others})" if others else ""
    )
    if len(tied) > 1:
        why += (
            f"; within noise: {order[0]}'s {metric} lies in the 95% interval of "
            f"{', '.join(n for n in tied if n != order[0])}, "
            f"so select.tie_break {tie_break} chose {best}"
        )
    return best, why, [n for n in tied if n != best]


def table(scores: dict[str, dict], best: str, why: str, metric: str) -> str:
    """The comparison as a Markdown table, one row per candidate, with the 95% interval of `metric`."""

    def cell(value) -> str:
        if value is None:
            return "n/a"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        f"| candidate | kind | parameters | {metric} 95% interval | " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 4),
    ]
    # cost: API price per million tokens (select.candidates.<name>.price_*_per_mtok) x tokens used; n/a for
    # local models.
    for name in sorted(scores):
        s = scores[name]
        size = s.get("parameters", "api") if s.get("kind") == "local" else "api"
        mark = " **(chosen)**" if name == best else ""
        interval = (s.get("ci95") or {}).get(metric)
        shown = f"{interval['low']:.4f} - {interval['high']:.4f}" if interval else "n/a"
        lines.append(
            f"| {name}{mark} | {s.get('kind')} | {cell(size)} | {shown} | "
            + " | ".join(cell(s.get(c)) for c in COLUMNS)
            + " |"
        )
    return "\n".join(["# Base model selection", "", *lines, "", f"Chosen: **{best}**, {why}.", ""])


def main() -> None:
    base, p = params.load("base", "select")
    scores = {name: read_json(Path(base.metrics_dir) / "select" / f"{name}.json") for name in p.candidates}
    best, why, tied = choose(scores, p.metric, p.tie_break)
    cand = p.candidates[best]
    write_json(
        base.selected,
        {
            "name": best,
            "kind": cand.kind,
            "model": cand.model,
            "revision": cand.revision,
            "trust_remote_code": cand.trust_remote_code,
            "base_url": cand.base_url,
            "api_key_env": cand.api_key_env,
            "metric": p.metric,
            "score": scores[best][p.metric],
            "why": why,
            "tied_with": tied,
            "tokenizer_hash": tokenizer_hash(cand.model) if cand.kind == "local" else "",
        },
    )
    Path(base.metrics_dir, "select_table.md").write_text(table(scores, best, why, p.metric), encoding="utf-8")
    print(f"choose: {best} ({why})")


if __name__ == "__main__":
    run(main)
