"""Run times and throughput, kept out of everything DVC hashes.

Two runs of the pipeline on the same machine write byte-identical outputs (the two-fresh-runs
test compares every one), so no stage output or stage metrics file may hold a clock reading:
wall seconds, tokens/s, latencies, start times. A stage splits those off its metrics (`split`)
and writes them to base.metrics_dir/timings/<stage>.json (`write`). That file is tracked by git
and listed in dvc.yaml's top-level `metrics:`, so `dvc metrics show`, `dvc metrics diff` and
`tuneline report --timings` show it, but it is no stage's output: DVC never hashes it, and a
rerun that DVC skips leaves the last run's timings in place.
"""

from __future__ import annotations

import re
from pathlib import Path

from tuneline.common.records import write_json

# Keys whose values are clock readings or rates per second (`total_flos` counts work, not time).
TIMING = re.compile(r"runtime|per_second|per_s$|latency|(^|[._])(seconds|elapsed|time|duration)\b|_s$|_at$")


def is_timing(key: str) -> bool:
    return bool(TIMING.search(key))


def split(metrics: dict) -> tuple[dict, dict]:
    """(metrics without timings, the timings), nested dicts split alike; empty branches dropped."""
    kept, timings = {}, {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            k, t = split(value)
            if k or not t:
                kept[key] = k
            if t:
                timings[key] = t
        elif is_timing(key):
            timings[key] = value
        else:
            kept[key] = value
    return kept, timings


def write(metrics_dir: str | Path, stage: str, timings: dict) -> Path:
    """Write a stage's timings to metrics_dir/timings/<stage>.json; return the path."""
    path = Path(metrics_dir) / "timings" / f"{stage}.json"
    write_json(path, timings)
    return path


def write_metrics(path: str | Path, metrics: dict, metrics_dir: str | Path, stage: str) -> dict:
    """Write `metrics` to `path` without their timings, and the timings to the stage's timings
    file; return the metrics as written."""
    kept, timings = split(metrics)
    write_json(path, kept)
    write(metrics_dir, stage, timings)
    return kept
