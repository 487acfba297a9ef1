"""Score one candidate base model on the validation split (one DVC stage per candidate).

Reads:  base.alpaca_dir/val.json (and train.json for an API candidate's few-shot examples),
        select.judge.prompt and retry_prompt when select.judge.enabled,
        select.candidates.<name> and the select keys listed for it in dvc.yaml.
Writes: base.metrics_dir/select/<name>.json (loss, perplexity, ROUGE, BLEU, exact match, size, and
        each score's 95% bootstrap interval over the records (ci95); for an API candidate: no loss,
        and tokens and cost of its replies; with select.judge.enabled: `judge`, the LLM
        judge's win rate of the candidate's answers over the reference answers, and `judge_rates`),
        base.cache_dir/select/<name>/ (persisted replies of an API candidate and, in judge/, of the
        judge: a rerun pays nothing), base.metrics_dir/timings/select-<name>.json (generation seconds;
        an API candidate's mean latency per call made this run).
Run:    python -m stages.select <name>
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages import run
from tuneline.common import params, timings
from tuneline.common.records import read_json
from tuneline.eval.intervals import score_intervals
from tuneline.eval.scoring import score
from tuneline.model.modeling import check_model_source, load_model, load_tokenizer, set_seed
from tuneline.model.templates import chat_template_for, with_fixed_date


def local_tokenizer(cand, template: str, template_date: str):
    """The candidate's tokenizer with the chat template to score it with put on it: tokenize.template,
    the one training will use (`auto`: its own; a tokenizer without one fails here as tokenize would
    fail, naming the key), today's date in it fixed to tokenize.template_date as the tokenize stage
    fixes it: a base whose template prints the date (Llama 3.1) scores the same on every day."""
    tokenizer = load_tokenizer(cand.model, cand.revision, cand.trust_remote_code)
    try:
        tokenizer.chat_template = with_fixed_date(chat_template_for(tokenizer, template), template_date)
    except ValueError as err:
        raise params.ParamsError(f"select: candidate {cand.model}: {err}") from None
    return tokenizer


def judged(j, records: list[dict], rows: list[dict], cache_dir: Path, seed: int) -> tuple[float, dict, dict]:
    """The judge's win rate of the candidate over the reference answers on the records it answered
    (the first generation_samples; each pair asked in both orders, a tie counts half), its 95%
    bootstrap interval, and the win/tie/loss/unparsed rates behind it."""
    from tuneline.eval import judge

    answered = [r["answer"] for r in rows if "answer" in r]
    sample = records[: len(answered)]
    summary, verdicts, _ = judge.run(
        j, "select.judge", sample, answered, [r["output"] for r in sample], cache_dir, seed
    )
    rate, interval = judge.win_rate(verdicts, seed)
    return rate, interval, summary


def main(name: str) -> None:
    base, p, tok = params.load("base", "select", "tokenize")
    params.check_environment("select", p)
    if name not in p.candidates:
        raise params.ParamsError(
            f"select: no candidate {name!r} in select.candidates (known: {', '.join(p.candidates)})"
        )
    cand = p.candidates[name]
    if p.judge.enabled:
        from tuneline.eval import judge

        judge.preflight(p.judge, "select.judge")
    records = read_json(Path(base.alpaca_dir) / "val.json")
    cache_dir = Path(base.cache_dir) / "select" / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    if cand.kind == "api":
        from tuneline.eval.apiscoring import score_api_candidate

        shots = read_json(Path(base.alpaca_dir) / "train.json")[: cand.few_shot_k]
        metrics, rows = score_api_candidate(name, cand, p, records, shots, cache_dir, base.seed)
    else:
        check_model_source(cand.model, cand.revision, f"select.candidates.{name}.model")
        set_seed(base.seed)
        tokenizer = local_tokenizer(cand, tok.template, tok.template_date)
        model = load_model(cand.model, cand.revision, cand.trust_remote_code, dtype=p.dtype)
        metrics, rows = score(
            model, tokenizer, records, "auto", p.batch_size, p.max_new_tokens, p.generation_samples
        )
        metrics["ci95"] = score_intervals(rows, [r["output"] for r in records], base.seed)
        metrics.update(
            kind="local",
            model=cand.model,
            parameters=sum(x.numel() for x in model.parameters()),
            template=tok.template,
        )
    if p.judge.enabled:
        rate, interval, rates = judged(p.judge, records, rows, cache_dir / "judge", base.seed)
        metrics.update(judge=rate, judge_rates=rates)
        metrics["ci95"]["judge"] = interval
    metrics["name"] = name
    timings.write_metrics(
        Path(base.metrics_dir) / "select" / f"{name}.json", metrics, base.metrics_dir, f"select-{name}"
    )
    print(f"select: {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m stages.select <candidate name from select.candidates>")
    run(main, sys.argv[1])
