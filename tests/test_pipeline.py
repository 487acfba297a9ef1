"""End to end: `dvc repro` in a temporary git repository copy of the project.

The whole chain runs on the embedded default (bundled site, tiny offline models, the loopback
LLM server); a second repro runs nothing; a param change reruns its stage and what follows only.
"""

import json
import re
import subprocess

import pytest
import yaml

from tests.pipeline_repo import declared_params, repro, run, set_param, with_downstream
from tuneline.common.records import read_jsonl_dir
from tuneline.data.review import append_decision, make_decision

pytestmark = pytest.mark.slow

UPSTREAM = {"models", "crawl", "feedback", "augment", "clean"}


def all_stages(repo) -> set[str]:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    names = {
        "models",
        "crawl",
        "feedback",
        "augment",
        "clean",
        "build",
        "choose",
        "pretrain",
        "tokenize",
        "train",
        "evaluate",
        "export",
    }
    return names | {f"select@{c}" for c in params["select"]["candidates"]}


def covered(key: str, declared: set[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def test_each_stage_declares_exactly_the_params_it_reads(pipeline):
    repo, first = pipeline
    reads: dict[str, set[str]] = {}
    for line in first["audit"].read_text().splitlines():
        entry = json.loads(line)
        reads.setdefault(entry["stage"], set()).update(entry["reads"])
    declared = declared_params(repo)
    assert set(reads) == set(declared)
    for stage, keys in declared.items():
        undeclared = sorted(k for k in reads[stage] if not covered(k, keys))
        assert not undeclared, f"{stage} reads params that dvc.yaml does not list: {undeclared}"
    # The other way round, per script: a foreach stage declares one list for all its items,
    # so a key counts as used when some item of that stage reads it.
    by_script: dict[str, tuple[set, set]] = {}
    for stage, keys in declared.items():
        script = stage.split("@")[0]
        decl, used = by_script.setdefault(script, (set(), set()))
        decl |= {k for k in keys if ".candidates." not in k}
        used |= reads[stage]
    for script, (decl, used) in by_script.items():
        unused = sorted(d for d in decl if not any(covered(k, {d}) for k in used))
        assert not unused, f"{script} lists params in dvc.yaml that its code never reads: {unused}"


def restore(repo) -> None:
    run(repo, "git", "checkout", "--", "params.yaml")
    repro(repo)


def test_first_repro_runs_every_stage_and_writes_the_outputs(pipeline):
    repo, first = pipeline
    # Every stage ran, but for those whose outputs are committed with main's dvc.lock and whose deps came
    # out the same (choose: select wrote the committed scores byte for byte): DVC rightly skips those.
    assert first["ran"] | first["skipped"] == all_stages(repo) and first["skipped"] <= {"choose"}
    for name in ("crawl", "augment", "clean", "build", "tokenize", "eval"):
        assert (repo / "metrics" / f"{name}.json").exists(), name
    assert (repo / "metrics/train/metrics.json").exists()
    assert (repo / "models/export/model.safetensors").exists()
    assert (repo / "models/export/README.md").read_text().count("md5") >= 1
    for split in ("train", "val", "test"):
        assert json.loads((repo / f"data/alpaca/{split}.json").read_text()), split
    build = json.loads((repo / "metrics/build.json").read_text())
    assert build["records_out"] == build["train"] + build["val"] + build["test"]
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluation["seen"]["tuned"]["loss"] < evaluation["seen"]["base"]["loss"]
    assert evaluation["unseen"]["records"] == build["test"]
    # the default's judge (the tiny base model through `transformers serve`, label verdicts forced by
    # logit_bias): every reply of both orders parsed, so every pair has a verdict
    judged = evaluation["unseen"]["judge"]
    assert judged["pairs"] == build["test"] and judged["unparsed"] == 0.0
    assert judged["win"] + judged["tie"] + judged["loss"] == pytest.approx(1.0) and "net_win_ci95" in judged
    models = json.loads((repo / "metrics/models.json").read_text())
    for name, m in models.items():  # every candidate was pretrained: it knows more than chance
        assert m["pretrain_steps"] > 0 and m["heldout_loss"] < m["heldout_loss_before"] - 0.5, name
    decontamination = json.loads((repo / "metrics/pretrain.json").read_text())["base_corpus"]
    assert decontamination["files"] > 0 and decontamination["test"]["contaminated"] == 0


def test_metrics_are_tracked_by_git_not_ignored(pipeline):
    repo, _ = pipeline
    for path in (
        "metrics/eval.json",
        "metrics/build.json",
        "metrics/train/metrics.json",
        "models/selected.json",
        "metrics/timings/train.json",
    ):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=repo).returncode == 1, path
    shown = run(repo, "dvc", "metrics", "show", "--json").stdout
    assert "eval.json" in shown and "build.json" in shown
    assert "timings/train.json" not in shown  # how fast stays out of the view of how good
    assert (
        "timings/train.json" in run(repo, "dvc", "metrics", "show", "-R", "metrics/timings", "--json").stdout
    )


def test_run_times_are_in_the_timings_files_not_in_hashed_outputs(pipeline):
    repo, _ = pipeline
    clock = {p.stem: json.loads(p.read_text()) for p in (repo / "metrics/timings").glob("*.json")}
    assert {"crawl", "augment", "models", "select-tiny_qwen", "train", "evaluate"} <= set(clock)
    assert clock["train"]["train_runtime"] > 0 and clock["train"]["tokens_per_s"] > 0
    assert clock["models"]["tiny_qwen"]["seconds"] > 0 and clock["crawl"]["sources"]["bundled"]["started_at"]
    hashed = [
        p
        for p in (repo / "metrics").rglob("*")
        if p.is_file() and "timings" not in p.parts and "logs" not in p.parts
    ]
    for path in hashed:  # DVCLive's curves included: no runtime, samples/s or tokens/s file or key
        assert not any(
            word in str(path.relative_to(repo)) for word in ("runtime", "per_second", "tokens_per_s")
        ), path
        if path.suffix == ".json":
            assert not re.search(r'"[^"]*(runtime|per_second|_s|_at|seconds)":', path.read_text()), path


def test_second_repro_runs_nothing(pipeline):
    repo, _ = pipeline
    second = repro(repo)
    assert second["ran"] == set()
    assert second["skipped"] == all_stages(repo)


def test_build_param_reruns_build_and_downstream_only(pipeline):
    repo, _ = pipeline
    set_param(repo, "build.val_fraction", 0.2)
    try:
        # build runs for real and writes other splits; the stages whose deps that changed, and all
        # that depend on them, are what the next `dvc repro` reruns (the learning-rate test below runs
        # such a rerun to the end)
        assert repro(repo, "build")["ran"] == {"build"}
        stale = set(json.loads(run(repo, "dvc", "status", "--json").stdout))
        assert stale and not stale & UPSTREAM
        assert with_downstream(repo, stale) == all_stages(repo) - UPSTREAM - {"build"}
    finally:
        restore(repo)


def test_learning_rate_reruns_train_and_what_follows_only(pipeline):
    repo, _ = pipeline
    set_param(repo, "train.learning_rate", 0.001)
    set_param(repo, "train.epochs", 2)  # what is tested is which stages rerun, not what 70 epochs learn
    result = repro(repo)
    try:
        assert result["ran"] == {"train", "evaluate", "export"}
    finally:
        restore(repo)


@pytest.mark.parametrize(
    ("path", "stage", "upstream"),
    [
        ("prompts/expand.txt", "augment", {"models", "crawl"}),
        ("tuneline/data/clean.py", "clean", {"models", "crawl", "augment"}),
    ],
)
def test_editing_code_or_a_prompt_reruns_its_stage_not_upstream(pipeline, path, stage, upstream):
    repo, _ = pipeline
    file = repo / path
    original = file.read_text()
    file.write_text(
        original
        + ("\n# edited\n" if path.endswith(".py") else "\nKeep every answer under three sentences.\n")
    )
    try:
        # `dvc repro <stage>` runs the stage and whatever upstream changed, nothing downstream:
        # what is under test is that the edit reaches its stage and not the stages before it.
        result = repro(repo, stage)
        assert stage in result["ran"]
        assert not result["ran"] & upstream
    finally:
        file.write_text(original)
        repro(repo)


def test_a_review_decision_reruns_clean_and_shows_in_metrics_diff(pipeline):
    repo, _ = pipeline
    decisions = repo / "data/review/decisions.jsonl"
    original = decisions.read_text()
    record = read_jsonl_dir(repo / "data/clean/records")[0]
    append_decision(decisions, make_decision(record, "reject", "tester", "wrong answer"))
    try:
        # Up to clean only: the stages after it are shown to be out of date, not rerun (minutes).
        result = repro(repo, "clean")
        # a seed, crawled or dataset record's reject (here a dataset row) is no feedback for the
        # generator: augment is skipped
        assert record["source"] != "generated"
        assert {"feedback", "clean"} <= result["ran"] and not result["ran"] & {"models", "crawl", "augment"}
        rejects = {r["id"]: r for r in read_jsonl_dir(repo / "data/clean/rejects")}
        assert rejects[record["id"]]["reason"] == "human"
        assert record["id"] not in {r["id"] for r in read_jsonl_dir(repo / "data/clean/records")}
        would_run = repro(repo, "--dry")["ran"]
        assert "build" in would_run and not would_run & UPSTREAM
        diff = json.loads(run(repo, "dvc", "metrics", "diff", "--json").stdout)["metrics/clean.json"]
        assert diff["human.rejected"]["new"] == 1 and diff["rejects_by_reason.human"]["new"] == 1
        # cleanlab's checks run again on the records that remain, so its flags may shift either way
        # (measured: 102 kept -> 100 once; 112 -> 113 on 2026-12-04, two label flags fewer); the
        # accounting holds: every record in is kept or rejected with a reason.
        metrics = json.loads((repo / "metrics/clean.json").read_text())
        assert metrics["records_out"] == diff["records_out"]["new"]
        assert metrics["records_in"] == metrics["records_out"] + sum(metrics["rejects_by_reason"].values())
    finally:
        decisions.write_text(original)
        repro(repo, "clean")  # back to the state the other tests expect (from DVC's run cache)
