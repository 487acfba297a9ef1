"""Bench clean.engine: the clean stage on the same records with engine inprocess and engine ray.

Records: bench/scale.py's synthetic instruction rows with their planted faults (--records, default
10,000), through crawl.datasets and augment's pass-through once; then the clean stage twice, as DVC
runs it (`python -m stages.clean`, its own process, cold embedding cache each time): clean.engine
inprocess, then clean.engine ray with RAY_ADDRESS unset, so the stage starts a local Ray on this
machine's cores (its start-up is part of the time). Measured per engine: wall seconds, the driver's
CPU seconds and peak RSS (Ray's worker processes are not children the driver waits for: their CPU and
memory are not in these figures), and whether the two runs wrote byte-identical outputs.

Run:  nice .venv/bin/python bench/clean_engine.py [--records 10000] [--encoder standin]
      (writes bench/results/scale_ray.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds dvc.py, which would shadow the dvc package: the project root stands in its place
sys.path[0] = str(ROOT)

import yaml  # noqa: E402

from bench.scale import build_standin_encoder, embedded_texts, make_project, run_stage, synthetic_lines  # noqa: E402

ENGINES = ("inprocess", "ray")


def set_engine(project: Path, engine: str) -> None:
    path = project / "params.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["clean"]["engine"] = engine
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def clean_outputs(project: Path) -> dict[str, bytes]:
    """The clean stage's outputs in `project`, as bytes."""
    from tuneline.common import params

    base = params.section("base", path=project / "params.yaml")
    names = [
        Path(base.clean_dir) / "records.jsonl",
        Path(base.clean_dir) / "rejects.jsonl",
        Path(base.metrics_dir) / "clean.json",
        Path(base.metrics_dir) / "clean_report.md",
    ]
    return {str(n): (project / n).read_bytes() for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--encoder",
        choices=["params", "standin"],
        default="params",
        help="params: clean.embedding_model as params.yaml sets it (MiniLM); standin: "
        "bench/scale.py's one-layer encoder",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale_ray.json"))
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    from tuneline.common import params

    loads = [os.getloadavg()[0]]
    runs: dict[str, dict] = {}
    outputs: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        encoder = str(build_standin_encoder(Path(tmp) / "standin")) if args.encoder == "standin" else None
        lines, _ = synthetic_lines(args.records, args.seed)
        # The tokenizer is not used: only crawl and clean run.
        project = make_project(Path(tmp) / "project", Path(tmp) / "no-tokenizer", lines, encoder)
        base = params.section("base", path=project / "params.yaml")
        run_stage(project, "crawl")
        (project / base.augmented_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy2(
            project / base.raw_dir / "datasets.jsonl", project / base.augmented_dir / "records.jsonl"
        )
        records_in = sum(1 for _ in (project / base.augmented_dir / "records.jsonl").open(encoding="utf-8"))
        for engine in ENGINES:
            set_engine(project, engine)
            shutil.rmtree(project / base.cache_dir / "embeddings", ignore_errors=True)
            (project / "clean.log").unlink(missing_ok=True)
            print(f"{records_in:,} records: clean with engine {engine} ...", flush=True)
            runs[engine] = {**run_stage(project, "clean"), "texts_embedded": embedded_texts(project)}
            outputs[engine] = clean_outputs(project)
            loads.append(os.getloadavg()[0])
    results = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_1m": [round(x, 2) for x in loads],
        "records_in": records_in,
        "encoder": args.encoder,
        "clean": runs,
        "outputs_identical": outputs["ray"] == outputs["inprocess"],
        "ray_over_inprocess_wall": round(runs["ray"]["wall_s"] / runs["inprocess"]["wall_s"], 3),
        "note": "ray: a local Ray started by the stage (RAY_ADDRESS unset), its start-up included; cpu_s and "
        "peak_rss_mib are the driver's alone (Ray's workers are not its waited-for children)",
    }
    for engine, run in runs.items():
        print(
            f"{engine:>9}: {run['wall_s']:.1f} s wall, driver {run['cpu_s']:.1f} s CPU, "
            f"{run['peak_rss_mib']:.0f} MiB"
        )
    print(
        f"outputs identical: {results['outputs_identical']}; ray / inprocess wall: "
        f"{results['ray_over_inprocess_wall']}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
