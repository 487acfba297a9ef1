"""Run times kept apart from what DVC hashes (tuneline.common.timings)."""

import json

from tuneline.common import timings


def test_split_takes_clock_readings_out_of_nested_metrics():
    metrics = {
        "records": 10,
        "total_flos": 5.0,
        "train_runtime": 3.2,
        "train_samples_per_second": 9.0,
        "tokens_per_s": 80.0,
        "llm": {"calls": 4, "mean_latency_s": 0.4, "this_run": {"calls": 2}},
        "sources": {"site": {"pages": 3, "elapsed_s": 1.5, "started_at": "2026-12-01T05:00:00+00:00"}},
        "timed": {"seconds": 2.0},
        "empty": {},
    }
    kept, clock = timings.split(metrics)
    assert kept == {
        "records": 10,
        "total_flos": 5.0,
        "llm": {"calls": 4, "this_run": {"calls": 2}},
        "sources": {"site": {"pages": 3}},
        "empty": {},
    }
    assert clock == {
        "train_runtime": 3.2,
        "train_samples_per_second": 9.0,
        "tokens_per_s": 80.0,
        "llm": {"mean_latency_s": 0.4},
        "timed": {"seconds": 2.0},
        "sources": {"site": {"elapsed_s": 1.5, "started_at": "2026-12-01T05:00:00+00:00"}},
    }


def test_write_metrics_puts_the_timings_beside_not_inside(tmp_path):
    written = timings.write_metrics(
        tmp_path / "crawl.json", {"pages": 3, "elapsed_s": 1.5}, tmp_path, "crawl"
    )
    assert written == {"pages": 3} == json.loads((tmp_path / "crawl.json").read_text())
    assert json.loads((tmp_path / "timings" / "crawl.json").read_text()) == {"elapsed_s": 1.5}
