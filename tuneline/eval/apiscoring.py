"""Scoring a hosted (API) model as a base-model candidate, beside the open models.

The candidate answers the validation prompts zero-shot (or with k examples from the train split
as earlier turns) through the same cached, rate-limited `openai` client code as augment, so a
rerun repays nothing. An API model reports no loss: loss and perplexity are None, never 0.
"""

from __future__ import annotations

from pathlib import Path

from tuneline.common.records import EndpointError
from tuneline.data.alpaca import to_messages
from tuneline.eval.intervals import score_intervals
from tuneline.eval.textmetrics import corpus_scores, record_scores
from tuneline.llm.client import Endpoint, complete_many_sync, ledger
from tuneline.llm.server import endpoint_url


def prompts(records: list[dict], shots: list[dict]) -> list[list[dict]]:
    """Chat messages for each record: the k example records as earlier turns, then its prompt."""
    prefix = []
    for shot in shots:
        prefix += [m for m in to_messages(shot) if m["role"] != "system"]
    out = []
    for record in records:
        messages = to_messages(record, with_answer=False)
        system = [m for m in messages if m["role"] == "system"]
        out.append(system + prefix + [m for m in messages if m["role"] != "system"])
    return out


def score_api_candidate(
    name: str, cand, p, records: list[dict], shots: list[dict], cache_dir: str | Path, seed: int
) -> tuple[dict, list[dict]]:
    """Generation metrics, tokens, cost and latency of an API candidate on `records`, and the
    per-record rows (answer and scores) of the first generation_samples records."""
    sample = records[: p.generation_samples]
    with endpoint_url(cand.base_url, cand.model) as url:
        endpoint = Endpoint(
            base_url=url,
            model=cand.model,
            api_key_env=cand.api_key_env or "OPENAI_API_KEY",
            temperature=0.0,
            max_tokens=p.max_new_tokens,
            concurrency=cand.concurrency,
            requests_per_minute=cand.requests_per_minute,
            max_retries=cand.max_retries,
            timeout_s=cand.timeout_s,
            key_url="local"
            if cand.base_url == "local"
            else "",  # the started server's port changes every run
        )
        replies = complete_many_sync(endpoint, prompts(sample, shots), cache_dir, seed)
    failed = [r.error for r in replies if r.error is not None]
    if failed:
        raise EndpointError(
            f"select: API candidate {name}: {len(failed)} of {len(replies)} calls failed; first: {failed[0]}"
        )
    answers = [r.text.strip() for r in replies]
    usage = ledger(replies, cand.price_prompt_per_mtok, cand.price_completion_per_mtok)
    metrics = {
        "kind": "api",
        "model": cand.model,
        "loss": None,
        "perplexity": None,
        "records": len(sample),
        "few_shot_k": len(shots),
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        # the calls this run made (a cached reply takes no time); a timing, so the stage writes it to its
        # timings file
        "cost": usage["cost"],
        "latency_per_answer_s": usage["mean_latency_s"],
    }
    references = [r["output"] for r in sample]
    metrics.update(corpus_scores(answers, references))
    # No loss to resample: the rows carry only the generation metrics.
    rows = [{"answer": a, **record_scores(a, ref)} for a, ref in zip(answers, references)]
    metrics["ci95"] = score_intervals(rows, references, seed)
    return metrics, rows
