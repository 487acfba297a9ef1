"""Bench generation at scale: 10,000 generated records, live concurrent calls versus the Batch API,
against a loopback server that takes 200 ms for every HTTP request (chat, files and batches alike).

Both runs are the real round loop (`tuneline.data.augment.run_rounds`, grounded generation from 40 document
chunks, 5 records per call, response_format json_schema) over `tuneline.llm.client`: `complete_many` at
concurrency 32 (the baseline), and `complete_batch` (one JSONL upload, one batch, polls every 0.5 s,
one download). The scripted server of the tests answers a batch as soon as it is polled: a provider's
queue time (minutes to 24 h) is not in these wall times, which measure what the client spends. Cost uses
named example prices (USD 0.15 / 0.60 per million prompt / completion tokens) and the batch rate of
half (augment.batch_price_factor 0.5).

Run:  .venv/bin/python bench/batch.py   (writes bench/results/batch.json)
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.augment import chunks, respond  # noqa: E402
from tests.openai_stub import ScriptedServer  # noqa: E402
from tuneline.common import params  # noqa: E402
from tuneline.common.records import write_json  # noqa: E402
from tuneline.data import augment  # noqa: E402
from tuneline.llm import client as llm  # noqa: E402

RECORDS = 10_000
PER_CALL = 5
LATENCY_S = 0.2
CONCURRENCY = 32
PRICES = {"price_prompt_per_mtok": 0.15, "price_completion_per_mtok": 0.60}


def run(p, server: ScriptedServer, cache_dir: Path, batch: bool) -> dict:
    """One generation of RECORDS records, live or through the Batch API; wall time, requests, tokens, cost."""
    p = dataclasses.replace(
        p,
        rounds=1,
        pilot_size=RECORDS,
        per_call=PER_CALL,
        concurrency=CONCURRENCY,
        requests_per_minute=1_000_000,
        reply_retries=0,
        structured="json_schema",
    )
    endpoint = augment.endpoint(p, server.base_url)

    def call(requests: list[list[dict]], seed: int, formats: list[dict | None]) -> list[llm.Reply]:
        if batch:
            return llm.complete_batch(endpoint, requests, cache_dir, seed, formats, poll_s=0.5)
        return llm.complete_many_sync(endpoint, requests, cache_dir, seed, formats)

    server.reset_counts()
    server.batch_http_requests = 0
    started = time.perf_counter()
    result = augment.run_rounds(
        p, [], chunks(), [], augment.load_templates(ROOT / p.prompts_dir), call, seed=42
    )
    seconds = time.perf_counter() - started
    usage = llm.ledger(result.replies, **PRICES, batch_price_factor=0.5)
    return {
        "records": len(result.records),
        "calls": usage["calls"],
        "seconds": round(seconds, 2),
        "http_requests": server.requests + server.batch_http_requests,
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "cost_usd": usage["cost"],
    }


def main() -> None:
    p = params.section("augment", path=ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp, ScriptedServer(respond=respond, latency_s=LATENCY_S) as server:
        results = {
            "concurrent": run(p, server, Path(tmp, "live"), batch=False),
            "batch": run(p, server, Path(tmp, "batch"), batch=True),
        }
    live, batch = results["concurrent"], results["batch"]
    results.update(
        baseline="concurrent",
        latency_s=LATENCY_S,
        concurrency=CONCURRENCY,
        records_per_call=PER_CALL,
        prices=PRICES,
        batch_price_factor=0.5,
        wall_ratio=round(batch["seconds"] / live["seconds"], 3),
        same_records=live["records"] == batch["records"],
    )
    write_json(ROOT / "bench/results/batch.json", results)
    print(
        f"batch bench: {RECORDS} records, {PER_CALL} a call, loopback server {LATENCY_S * 1000:.0f} ms per "
        f"HTTP request"
    )
    print(
        f"{'run':<12} {'records':>8} {'calls':>6} {'http req':>9} {'seconds':>8} {'prompt tok':>11} "
        f"{'compl tok':>10} {'cost $':>8}"
    )
    for name, r in (("concurrent", live), ("batch", batch)):
        print(
            f"{name:<12} {r['records']:>8} {r['calls']:>6} {r['http_requests']:>9} {r['seconds']:>8.2f} "
            f"{r['prompt_tokens']:>11} {r['completion_tokens']:>10} {r['cost_usd']:>8.4f}"
        )
    print(
        f"batch / concurrent wall time: {results['wall_ratio']:.3f} (concurrency {CONCURRENCY}; provider "
        f"queue time "
        "not included); cost at the batch rate: half"
    )


if __name__ == "__main__":
    main()
