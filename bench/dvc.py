"""Bench DVC's own overhead: a no-op `dvc repro` and `dvc status` on the default pipeline, and their growth.

Setup: `tests.pipeline_repo.make_repo` copies the project into a fresh temporary git repository
and the real `dvc repro` runs the default pipeline once (crawl of the bundled site, augment
against the loopback LLM server, the tiny train, ...: a few minutes on 2 cores).

Measured, in one run (each time is the median of 3 runs of the CLI, Python start-up included):
- `dvc --version`: the floor, the CLI's start-up alone;
- baseline: the default pipeline as it is (data/raw/ holds the crawl stage's 3 files): a no-op
  `dvc repro` (every stage skipped) and `dvc status`, then `dvc status` right after touching
  (mtime only) the data/raw/ files, which makes DVC rehash them instead of trusting its state db;
- growth: what varies is the number of files under data/raw/: N small files (30, 300, 3,000,
  30,000, i.e. 10x, 100x, 1,000x, 10,000x the 3 of the baseline) in `data/raw/extra`, which two
  stages added to the copy's dvc.yaml track the way crawl -> augment track data/raw/: `bench_gen`
  writes it as a cached output, `bench_use` reads it as a dependency. Both run once (not timed),
  then the same three timings as the baseline, the touch going to the N extra files.
  (A `dvc add`-ed directory would not do: `dvc repro` without targets only checks dvc.yaml.)
Sizes whose projected cost would push the bench past its time budget are skipped and listed.
Target: a no-op `dvc repro` < 5 s on the default pipeline.

Run:  .venv/bin/python bench/dvc.py   (writes bench/results/dvc.json)
"""

from __future__ import annotations

import sys

# This file is named like the `dvc` package: take bench/ off the import path before anything imports it.
sys.path[:] = [p for p in sys.path if p and __file__.rsplit("/", 1)[0] not in (p, p.rstrip("/"))]

import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.pipeline_repo import RAN, make_repo, repro, run  # noqa: E402

BASELINE_RAW_FILES = 3
EXTRA_SIZES = (30, 300, 3_000, 30_000)
REPEATS = 3
TARGET_NOOP_REPRO_S = 5.0
BUDGET_S = 600.0
EXTRA_DIR = "data/raw/extra"

# Written into the temporary copy only: one small file per record, like a crawl split into shards.
GENERATOR = '''"""Write N small files into a directory (bench/dvc.py's growth stage)."""
import sys
from pathlib import Path

n, out = int(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for i in range(n):
    (out / f"{i:06d}.json").write_text(f'{{"id": {i}, "text": "extra record {i}"}}\\n', encoding="utf-8")
'''


def timed(repo: Path, *cmd: str) -> tuple[float, str]:
    """Seconds one CLI call takes, and what it printed; it must succeed."""
    start = time.perf_counter()
    out = run(repo, *cmd)
    return time.perf_counter() - start, out.stdout + out.stderr


def median_time(repo: Path, *cmd: str, must_print: str) -> float:
    """Median seconds of REPEATS calls, each checked to print `must_print` (a no-op stays a no-op)."""
    times = []
    for _ in range(REPEATS):
        seconds, text = timed(repo, *cmd)
        if must_print not in text or RAN.search(text):
            sys.exit(f"`{' '.join(cmd)}` was not a no-op:\n{text[-3000:]}")
        times.append(seconds)
    return statistics.median(times)


def files_under(folder: Path) -> list[Path]:
    """The data files under `folder`, recursively (DVC's .gitignore files left out)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".gitignore")


def touch(files: list[Path]) -> None:
    """Change the mtime only, so DVC's state db misses and the files are rehashed."""
    now = time.time()
    for f in files:
        os.utime(f, (now, now))


def measure(repo: Path, touched: list[Path]) -> dict:
    """No-op repro and status (medians), then status after touching `touched`."""
    noop_repro = median_time(repo, "dvc", "repro", must_print="didn't change, skipping")
    status = median_time(repo, "dvc", "status", must_print="up to date")
    touch(touched)
    after_touch, text = timed(repo, "dvc", "status")
    if "up to date" not in text:
        sys.exit(f"`dvc status` after an mtime-only touch reports changes:\n{text}")
    return {
        "noop_repro_s": round(noop_repro, 3),
        "status_s": round(status, 3),
        "status_after_touch_s": round(after_touch, 3),
    }


def add_growth_stages(repo: Path, n: int) -> float:
    """Point the bench stages at N files and run them once; return that setup's seconds (not a bench
    figure)."""
    start = time.perf_counter()
    run(
        repo,
        "dvc",
        "stage",
        "add",
        "-f",
        "-n",
        "bench_gen",
        "-d",
        "bench_gen.py",
        "-o",
        EXTRA_DIR,
        f"python bench_gen.py {n} {EXTRA_DIR}",
    )
    run(
        repo,
        "dvc",
        "stage",
        "add",
        "-f",
        "-n",
        "bench_use",
        "-d",
        EXTRA_DIR,
        "-O",
        "data/raw/extra_count.txt",
        f"python -c \"import os; open('data/raw/extra_count.txt', "
        f"'w').write(str(len(os.listdir('{EXTRA_DIR}'))))\"",
    )
    ran = repro(repo, "bench_use")["ran"]
    if ran != {"bench_gen", "bench_use"}:
        sys.exit(f"growth stages for N={n}: expected bench_gen and bench_use to run, ran {sorted(ran)}")
    return time.perf_counter() - start


def projected_cost(costs: list[tuple[int, float]], n: int) -> float:
    """Seconds a size of N files should take: a fixed part (the DVC calls) plus a part linear in N."""
    if not costs:
        return 0.0
    if len(costs) == 1:
        return 2 * costs[0][1]  # one point cannot split fixed from per-file cost: allow it to double
    (n1, s1), (n2, s2) = costs[-2:]
    return s2 + max(0.0, (s2 - s1) / (n2 - n1)) * (n - n2)


def print_table(rows: list[dict]) -> None:
    print(
        f"{'case':42} {'files in data/raw':>17} {'no-op repro s':>13} {'status s':>9} "
        f"{'status after touch s':>20}"
    )
    for r in rows:
        print(
            f"{r['case']:42} {r['raw_files']:17,d} {r['noop_repro_s']:13.2f} {r['status_s']:9.2f} "
            f"{r['status_after_touch_s']:20.2f}"
        )


def main() -> None:
    bench_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tuneline-dvc-bench-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        start = time.perf_counter()
        first = repro(repo)
        first_repro_s = time.perf_counter() - start
        print(
            f"first `dvc repro` of the default pipeline: {first_repro_s:.0f} s, {len(first['ran'])} stages "
            f"ran"
        )

        cli_floor = median_time(repo, "dvc", "--version", must_print=".")
        raw_files = files_under(repo / "data" / "raw")
        if len(raw_files) != BASELINE_RAW_FILES:
            print(f"note: data/raw holds {len(raw_files)} files, not {BASELINE_RAW_FILES}")
        rows = [
            {
                "case": "baseline: default pipeline",
                "extra_files": 0,
                "raw_files": len(raw_files),
                **measure(repo, raw_files),
            }
        ]
        print_table(rows[-1:])

        (repo / "bench_gen.py").write_text(GENERATOR, encoding="utf-8")
        skipped, setup_s, costs = [], {}, []
        for n in EXTRA_SIZES:
            elapsed = time.perf_counter() - bench_start
            projected = projected_cost(costs, n)
            if elapsed + projected > BUDGET_S:
                skipped.append(
                    {"extra_files": n, "projected_s": round(projected), "elapsed_s": round(elapsed)}
                )
                print(
                    f"skipped N={n:,}: projected {projected:.0f} s with {elapsed:.0f} s of the "
                    f"{BUDGET_S:.0f} s budget spent"
                )
                continue
            size_start = time.perf_counter()
            setup_s[n] = round(add_growth_stages(repo, n), 1)
            extra = sorted((repo / EXTRA_DIR).iterdir())
            rows.append(
                {
                    "case": f"+{n:,} files ({n // BASELINE_RAW_FILES:,}x) in {EXTRA_DIR}",
                    "extra_files": n,
                    "raw_files": len(files_under(repo / "data" / "raw")),
                    **measure(repo, extra),
                }
            )
            costs.append((n, time.perf_counter() - size_start))
            print_table(rows[-1:])

    base = rows[0]
    print(
        "\nvaried: the number of small files under data/raw/ (3 crawl outputs + N in data/raw/extra, an "
        "output of "
        "stage bench_gen and a dependency of stage bench_use, + bench_use's count file); medians of 3; "
        "'status after touch' is one run"
    )
    print(
        f"`dvc --version` (CLI start-up floor): {cli_floor:.2f} s; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    print_table(rows)
    for r in rows[1:]:
        print(
            f"N={r['extra_files']:>6,}: no-op repro {r['noop_repro_s'] / base['noop_repro_s']:.2f}x "
            f"baseline, "
            f"status {r['status_s'] / base['status_s']:.2f}x, status after touch "
            f"{r['status_after_touch_s'] / base['status_after_touch_s']:.2f}x"
        )
    met = base["noop_repro_s"] < TARGET_NOOP_REPRO_S
    print(
        f"target no-op `dvc repro` < {TARGET_NOOP_REPRO_S:.0f} s on the default pipeline: "
        f"{'met' if met else 'NOT met'} ({base['noop_repro_s']:.2f} s)"
    )

    result = {
        "varied": "number of small files under data/raw/: the 3 crawl outputs plus N files in "
        "data/raw/extra, "
        "an output of stage bench_gen and a dependency of stage bench_use (which writes "
        "data/raw/extra_count.txt) "
        "added to the copy's dvc.yaml",
        "baseline": "the default pipeline, unchanged (data/raw holds the crawl stage's outputs only)",
        "method": f"temporary git repo copy (tests/pipeline_repo.make_repo), one real `dvc repro`, then "
        f"medians of "
        f"{REPEATS} CLI runs; status_after_touch_s: one `dvc status` right after an mtime-only touch of the "
        f"data/raw files (baseline) or of the N extra files (growth rows)",
        "first_repro_s": round(first_repro_s, 1),
        "stages_first_run": sorted(first["ran"]),
        "cli_startup_s": round(cli_floor, 3),
        "rows": rows,
        "growth_setup_s": {str(k): v for k, v in setup_s.items()},
        "skipped_sizes": skipped,
        "target_noop_repro_s": TARGET_NOOP_REPRO_S,
        "target_met": met,
        "bench_wall_s": round(time.perf_counter() - bench_start, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "dvc": run(ROOT, "dvc", "--version").stdout.strip(),
        },
    }
    out = ROOT / "bench" / "results" / "dvc.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
