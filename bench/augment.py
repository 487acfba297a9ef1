"""Bench augment: records/s at concurrency 1 vs 8 against a loopback server with a fixed
200 ms per-request latency, and the cached rerun of 1,000 records.

Runs the real round loop (`tuneline.data.augment.run_rounds` over `tuneline.llm.client.complete_many`)
on grounded generation from 40 document chunks, 5 records per call, against the scripted
OpenAI-compatible server of the tests (requests counted server-side). Baseline in the same
run: concurrency 1. Targets: concurrency 8 >= 6x concurrency 1; cached rerun of 1,000
records < 5 s (and zero requests).

Run:  .venv/bin/python bench/augment.py   (writes bench/results/augment.json)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.openai_stub import ScriptedServer  # noqa: E402
from tuneline.common import params  # noqa: E402
from tuneline.common.records import write_json  # noqa: E402
from tuneline.data import augment  # noqa: E402
from tuneline.llm import client as llm  # noqa: E402

LATENCY_S = 0.2
PER_CALL = 5
TARGET_SPEEDUP = 6.0
TARGET_CACHED_S = 5.0


def respond(body: dict) -> str:
    """Grounded pairs: each answer is a sentence of the passage, each question unique."""
    prompt = body["messages"][0]["content"]
    n = int(re.search(r"Write (\d+) question-and-answer pairs", prompt).group(1))
    sentences = [
        s for s in re.search(r"<passage>\n(.*?)\n</passage>", prompt, re.S).group(1).split("\n") if s
    ]
    tag = hashlib.sha256(f"{prompt}{body['seed']}".encode()).hexdigest()[:10]
    return json.dumps(
        {
            "pairs": [
                {"question": f"What does note {tag}-{i} say?", "answer": sentences[i % len(sentences)]}
                for i in range(n)
            ]
        }
    )


def chunks() -> list[augment.Chunk]:
    return [
        augment.Chunk(
            f"http://bench/doc{d}.html",
            f"Doc {d}",
            f"Document {d} says beans keep a month.\nDocument {d} says grind just before brewing.",
            None,
        )
        for d in range(40)
    ]


def run(p, base_url: str, cache_dir: Path, records: int, concurrency: int) -> dict:
    """One generation run of `records` records; wall time and counts."""
    p = dataclasses.replace(
        p,
        rounds=1,
        pilot_size=records,
        per_call=PER_CALL,
        concurrency=concurrency,
        requests_per_minute=1_000_000,
        reply_retries=0,
    )
    endpoint = augment.endpoint(p, base_url)
    templates = augment.load_templates(ROOT / p.prompts_dir)

    def call(requests: list[list[dict]], seed: int, formats: list[dict | None]) -> list[llm.Reply]:
        return llm.complete_many_sync(endpoint, requests, cache_dir, seed, formats)

    started = time.perf_counter()
    result = augment.run_rounds(p, [], chunks(), [], templates, call, seed=42)
    seconds = time.perf_counter() - started
    return {
        "records": len(result.records),
        "rejected": len(result.rejects),
        "calls": len(result.replies),
        "cached_calls": sum(r.cached for r in result.replies),
        "seconds": round(seconds, 3),
        "records_per_s": round(len(result.records) / seconds, 1),
    }


def main() -> None:
    p = params.section("augment", path=ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp, ScriptedServer(respond=respond, latency_s=LATENCY_S) as server:
        results = {}
        for name, records, concurrency in (("concurrency_1", 60, 1), ("concurrency_8", 400, 8)):
            server.reset_counts()
            results[name] = {
                **run(p, server.base_url, Path(tmp, name), records, concurrency),
                "server_requests": server.requests,
                "server_max_in_flight": server.max_in_flight,
            }
        cache = Path(tmp, "cache_1000")
        server.reset_counts()
        fill = run(p, server.base_url, cache, 1000, 32)
        server.reset_counts()
        rerun = run(p, server.base_url, cache, 1000, 8)
        results["cached_rerun_1000"] = {
            **rerun,
            "server_requests": server.requests,
            "fill_seconds": fill["seconds"],
        }

    speedup = results["concurrency_8"]["records_per_s"] / results["concurrency_1"]["records_per_s"]
    results.update(
        latency_s=LATENCY_S,
        records_per_call=PER_CALL,
        speedup_c8_over_c1=round(speedup, 2),
        target_speedup=TARGET_SPEEDUP,
        target_cached_s=TARGET_CACHED_S,
        target_met=speedup >= TARGET_SPEEDUP
        and results["cached_rerun_1000"]["seconds"] < TARGET_CACHED_S
        and results["cached_rerun_1000"]["server_requests"] == 0,
    )
    write_json(ROOT / "bench/results/augment.json", results)

    print(
        f"augment bench: loopback server, {LATENCY_S * 1000:.0f} ms per request, {PER_CALL} records per call"
    )
    print(f"{'run':<20} {'records':>8} {'calls':>6} {'requests':>9} {'seconds':>8} {'records/s':>10}")
    for name in ("concurrency_1", "concurrency_8", "cached_rerun_1000"):
        r = results[name]
        print(
            f"{name:<20} {r['records']:>8} {r['calls']:>6} {r['server_requests']:>9} {r['seconds']:>8.2f} "
            f"{r['records_per_s']:>10.1f}"
        )
    print(
        f"speedup c8/c1: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x); cached rerun of "
        f"{results['cached_rerun_1000']['records']} records: {results['cached_rerun_1000']['seconds']:.2f} s "
        f"(target < {TARGET_CACHED_S} s); target met: {results['target_met']}"
    )


if __name__ == "__main__":
    main()
