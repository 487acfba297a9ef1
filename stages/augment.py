"""Augment the raw material into records: pass-through sources plus LLM-generated records.

Reads:  base.seeds, base.raw_dir/crawl.jsonl, base.raw_dir/datasets/ (shards),
        the prompt templates in augment.prompts_dir, base.feedback (a person's rejects of
        generated records, from the feedback stage, go into the next round's "avoid these
        mistakes"); params base, augment,
        and (augment.review_clean_rules) the clean stage's language and PII keys, so generated
        records meet the policy clean applies
Writes: base.augmented_dir/records/ (JSON Lines shards of about base.shard_records records, cut in arrival
        order: seeds, crawled, dataset, generated; sorted by id within a shard; source: seed | crawl |
        dataset | generated),
        base.augmented_dir/rejects.jsonl (every generated record or reply left out, with the reason,
        and the raw reply for replies that were not the JSON asked for),
        base.cache_dir/llm/ (one file per answered call; a rerun repeats no answered call),
        base.metrics_dir/augment.json (counts per source and round, rejects by reason, tokens, cost)
Run:    python -m stages.augment
        augment.base_url "local" starts `transformers serve` with structured outputs
        (tuneline.llm.structserve) on 127.0.0.1 for augment.model and stops it afterwards.
        Against a hosted API or a vLLM server:
        dvc exp run -S augment.base_url=https://api.openai.com/v1 -S augment.model=gpt-4o-mini
        with the key in the environment variable named by augment.api_key_env; add
        -S augment.batch=true to send each step's calls as one OpenAI batch (docs/generation.md).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import ExitStack
from pathlib import Path

from stages import run
from tuneline.common import params, timings
from tuneline.common.records import (
    EndpointError,
    InputError,
    duplicate_ids,
    read_json,
    write_jsonl,
    write_jsonl_shards,
)
from tuneline.data import augment
from tuneline.llm import client as llm
from tuneline.llm.server import endpoint_url

log = logging.getLogger("augment")


def require(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise InputError(f"{path}: not found; {fix}")
    return path


def main() -> None:
    logging.getLogger("httpx2").setLevel(
        logging.WARNING
    )  # one line per HTTP request, even in the log file, is noise
    base, p, clean = params.load("base", "augment", "clean")
    raw = Path(base.raw_dir)
    seeds = augment.seed_records(require(Path(base.seeds), "base.seeds names the hand-written seed file"))
    crawled, docs = augment.crawl_items(require(raw / "crawl.jsonl", "run `dvc repro crawl` first"))
    passthrough = seeds + crawled + augment.dataset_records(raw / "datasets")
    all_chunks = augment.doc_chunks(docs, p.chunk_chars)
    chunks = augment.budgeted_chunks(all_chunks, p.chunk_budget, base.seed)
    templates = augment.load_templates(p.prompts_dir)
    cache_dir = Path(base.cache_dir) / "llm"
    cache_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when no reply was cached
    # The request names a local model only by its path: its files join the cache key.
    salt = llm.model_fingerprint(p.model) if Path(p.model).is_dir() else ""

    with ExitStack() as server:
        # The server (or the remote URL) is needed only once a call is missing from the
        # cache: a fully cached rerun starts no server and sends nothing.
        endpoint = augment.endpoint(p, p.base_url)
        started = False

        def call(requests: list[list[dict]], seed: int, formats: list[dict | None]) -> list[llm.Reply]:
            nonlocal endpoint, started
            if not started and llm.uncached(endpoint, requests, cache_dir, seed, formats, cache_salt=salt):
                if p.base_url == "local":
                    url = server.enter_context(endpoint_url(p.base_url, p.model))
                    endpoint = dataclasses.replace(augment.endpoint(p, url), key_url="local")
                else:
                    llm.preflight(endpoint, "augment.base_url")
                started = True
            if p.batch:
                replies = llm.complete_batch(
                    endpoint,
                    requests,
                    cache_dir,
                    seed,
                    formats,
                    cache_salt=salt,
                    truncated_is_error=True,
                    poll_s=p.batch_poll_s,
                    rerun="rerun `dvc repro augment`",
                )
            else:
                replies = llm.complete_many_sync(
                    endpoint, requests, cache_dir, seed, formats, cache_salt=salt, truncated_is_error=True
                )
            log.info(
                "%d calls (%d cached, %d failed)",
                len(replies),
                sum(r.cached for r in replies),
                sum(r.error is not None for r in replies),
            )
            return replies

        rules = augment.review_rules(p, clean)
        human = read_json(require(Path(base.feedback), "run `dvc repro feedback` first"))
        result = augment.run_rounds(p, seeds, chunks, passthrough, templates, call, base.seed, rules, human)

    # Every call failing in transport (not a model writing nothing) means a wrong URL, model or key.
    failed = [
        r for r in result.replies if r.error is not None and r.error not in (llm.EMPTY_REPLY, llm.TRUNCATED)
    ]
    if result.replies and len(failed) == len(result.replies):
        raise EndpointError(
            f"every call to {p.model} failed, first error: {failed[0].error}. Check augment.base_url, "
            f"augment.model and the key in ${p.api_key_env}"
        )

    records = passthrough + result.records  # arrival order, which the shards are cut in
    twice = duplicate_ids(records)
    if twice:  # every input has its own id (records.with_ids): a shared one would hide a record
        raise RuntimeError(f"{len(twice)} record ids occur twice, first {twice[0]}: a bug, please report it")
    write_jsonl_shards(
        Path(base.augmented_dir) / "records", records, base.shard_records, augment.record_order
    )
    write_jsonl(Path(base.augmented_dir) / "rejects.jsonl", result.rejects)
    metrics = {
        **augment.summary(passthrough, result),
        "model": p.model,
        "chunks": len(all_chunks),
        "chunks_in_budget": len(chunks),
        "llm": llm.ledger(
            result.replies, p.price_prompt_per_mtok, p.price_completion_per_mtok, p.batch_price_factor
        ),
    }
    timings.write_metrics(Path(base.metrics_dir) / "augment.json", metrics, base.metrics_dir, "augment")
    if result.replies and len(failed) > p.max_failed_fraction * len(result.replies):
        # A non-zero exit makes DVC run the stage again; the cache makes that rerun send only these.
        raise EndpointError(
            f"{len(failed)} of {len(result.replies)} calls failed after retries, more than "
            f"augment.max_failed_fraction {p.max_failed_fraction}; first error: {failed[0].error}. They are "
            f"listed "
            f"under failed_calls in {base.metrics_dir}/augment.json; rerun the stage to ask only them again"
        )
    if metrics["rounds"]:
        print(augment.pilot_line(metrics["rounds"][0], result.rejects))
    human = sum(r["human_rejected"] for r in metrics["rounds"])
    print(
        f"augment: {metrics['records']} records ({metrics['records_by_source']}); generated "
        f"{metrics['generated']}, "
        f"accepted {metrics['accepted']}, rejected {metrics['rejected_records']} records and "
        f"{metrics['failed_replies']} "
        f"replies; {metrics['llm']['calls']} calls, {metrics['llm']['this_run']['calls']} made this run"
        + (f"; {human} generated records a reviewer rejected fed back as mistakes" if human else "")
    )


if __name__ == "__main__":
    run(main)
