"""The DVC workflows users come for, on the tiny default, in temporary git repositories:
sharing through a remote, experiments (direct and queued), the pull-request report, and
reproducibility across two fresh runs."""

import hashlib
import json
import re
import subprocess
import time

import pytest
import yaml

from tests.pipeline_repo import ROOT, make_repo, repro, run, set_param

pytestmark = pytest.mark.slow

# Outputs compared with the committed dvc.lock, which another machine may have written: not the
# persistent caches (embedding vectors are floats computed on this CPU) nor metrics (cleanlab's
# scores come from those vectors). Two runs on one machine are compared in full.
NOT_ACROSS_MACHINES = ("cache/", "metrics/")


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# The data stages: their outputs must have the same hashes on any machine (weights may not).
DATA_STAGES = ("crawl", "feedback", "augment", "clean", "build", "tokenize")


def lock_outs(repo, stages: tuple[str, ...] | None = None) -> dict[str, str]:
    """{output path: md5} of every output of `stages` (default: all) recorded in repo's dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {}
    for name, stage in lock["stages"].items():
        if stages is None or name in stages:
            for out in stage.get("outs", []):
                outs[out["path"]] = out["md5"]
    return outs


@pytest.fixture(scope="module")
def clone(pipeline, tmp_path_factory):
    """Clone B of the pipeline repository A, filled from A's `dvc push` to a directory remote."""
    repo_a, _ = pipeline
    remote = tmp_path_factory.mktemp("remote")
    run(repo_a, "dvc", "remote", "add", "-f", "-d", "shared", str(remote))
    run(repo_a, "git", "add", "-A")
    run(repo_a, "git", "commit", "-qm", "pipeline run")
    run(repo_a, "dvc", "push")
    repo_b = tmp_path_factory.mktemp("clone") / "b"
    subprocess.run(["git", "clone", "-q", str(repo_a), str(repo_b)], check=True)
    run(repo_b, "dvc", "pull")
    return repo_b


def test_a_clone_that_pulls_reruns_nothing_and_has_the_same_model(pipeline, clone):
    repo_a, _ = pipeline
    result = repro(clone)
    assert result["ran"] == set()
    for path in (
        "models/export/model.safetensors",
        "models/adapter/adapter_model.safetensors",
        "data/alpaca/train.json",
    ):
        assert sha(clone / path) == sha(repo_a / path), path


def test_experiments_run_and_show_with_their_metrics(clone):
    # Two epochs each: what is tested is the experiment machinery, not what the runs learn.
    run(
        clone,
        "dvc",
        "exp",
        "run",
        "-n",
        "rank16",
        "-S",
        "train.lora_r=16",
        "-S",
        "train.learning_rate=1e-4",
        "-S",
        "train.epochs=2",
    )
    run(clone, "dvc", "exp", "run", "--queue", "-n", "rank4", "-S", "train.lora_r=4", "-S", "train.epochs=2")
    run(clone, "dvc", "queue", "start")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(clone, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Success" in run(clone, "dvc", "queue", "status").stdout

    shown = json.loads(run(clone, "dvc", "exp", "show", "--json").stdout)
    exps = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                exps[rev.get("name") or exp.get("name")] = data
    assert {"rank16", "rank4"} <= set(exps)
    for name, lora_r in (("rank16", 16), ("rank4", 4)):
        data = exps[name]
        assert data["params"]["params.yaml"]["data"]["train"]["lora_r"] == lora_r
        metrics = data["metrics"]["metrics/eval.json"]["data"]
        assert metrics["unseen"]["tuned"]["loss"] > 0 and metrics["seen"]["tuned"]["loss"] > 0
    table = run(clone, "tuneline", "exps").stdout.splitlines()  # the compact view of the same experiments
    assert "train.lora_r" in table[0].split() and "unseen" in table[0]
    rows = {line.split()[0]: line for line in table[1:]}
    assert {"rank16", "rank4"} <= set(rows) and "runtime" not in "\n".join(table)
    run(clone, "git", "checkout", "--", "params.yaml", "dvc.lock")
    run(clone, "dvc", "checkout")


def test_report_shows_the_changed_param_and_metrics(clone):
    set_param(clone, "train.learning_rate", 0.01)
    set_param(clone, "train.epochs", 2)  # a short run: the report, not the training, is under test
    repro(clone)
    run(clone, "tuneline", "report", "--rev", "HEAD", "--out", "report.md")
    report = (clone / "report.md").read_text()
    # First the summary: the tuned model at HEAD -> now, paired over the same test records, with a verdict
    summary = report.split("## Verdict", 1)[0]
    assert re.search(
        r"- \*\*unseen loss\*\* \(mean over records\): tuned at `HEAD` [\d.]+ -> tuned now [\d.]+, "
        r"[+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] over the same \d+ records: \*\*(better|worse|within "
        r"noise)\*\*",
        summary,
    ), summary
    # only the curves that help (the metrics table may still list the counters)
    assert "epoch.png" not in report and "num_input_tokens_seen.png" not in report and "_loss.png" in report
    # Then the verdict: the changed unseen loss delta, its interval, its word, and what it was at HEAD
    first = report.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert re.search(
        r"\| unseen \| loss \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] \| "
        r"\*\*(better|worse|within noise)\*\* \| [+-][\d.]+ \((better|worse|within noise)\) \|",
        first,
    ), first
    assert "train.learning_rate" in report and "0.004" in report and "0.01" in report
    assert "metrics/train/metrics.json" in report.split("<details>", 1)[1]
    assert "train_runtime" not in report  # timings only with --timings
    assert (
        list((clone / "report_plots").glob("*.png"))
        and "![train_loss](report_plots/train_loss.png)" in report
    )
    run(clone, "git", "checkout", "--", "params.yaml")


def test_two_fresh_runs_give_identical_outputs(pipeline_build, tmp_path_factory):
    repo_a = pipeline_build / "project"  # as its first run left it: tests change their copies only
    repo_c = make_repo(tmp_path_factory.mktemp("fresh") / "c")
    repro(repo_c)
    a, c = lock_outs(repo_a), lock_outs(repo_c)
    # every output, caches and metrics included: run times live in metrics/timings/, no stage's output
    assert {
        "data/alpaca",
        "data/tokenized",
        "models/adapter",
        "data/augmented/records",
        "data/raw/crawl.jsonl",
        "cache/llm",
        "cache/embeddings",
        "metrics/models.json",
        "metrics/train/metrics.json",
        "metrics/eval.json",
        "metrics/crawl.json",
        "metrics/augment.json",
    } <= set(a)
    differing = sorted(p for p in a if a[p] != c.get(p))
    assert not differing, f"outputs differ between two fresh runs: {differing}"
    assert json.loads((repo_c / "metrics/timings/models.json").read_text())["tiny_qwen"]["seconds"] > 0


def test_data_outputs_match_the_committed_dvc_lock(pipeline_build):
    # `make run` on main commits dvc.lock and metrics/; a fresh copy that runs the data stages
    # must write exactly the data whose hashes that dvc.lock records.
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "dvc.lock"], cwd=ROOT, capture_output=True
    )
    assert tracked.returncode == 0, (
        "dvc.lock is not committed: run `make run` and commit dvc.lock and metrics/"
    )
    committed, fresh = lock_outs(ROOT, DATA_STAGES), lock_outs(pipeline_build / "project", DATA_STAGES)
    compared = {p for p in committed if not p.startswith(NOT_ACROSS_MACHINES)}
    assert {
        "data/raw/crawl.jsonl",
        "data/augmented/records",
        "data/clean/records",
        "data/alpaca",
        "data/tokenized",
    } <= compared
    differing = sorted(p for p in compared if committed[p] != fresh.get(p))
    assert not differing, f"data differs from what the committed dvc.lock records: {differing}"
