"""stages/__init__.py, the entry point every stage runs through: a stage that fails (an exception,
SIGTERM, Ctrl-C under `dvc exp run`) puts back the git-tracked outputs DVC removed before running
it, in temporary git + DVC copies of the project."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline_repo import ROOT, env, make_repo, run

TRAIN_FILES = ("metrics/train/metrics.json", "metrics/train/plots/metrics/loss.tsv")
CHOOSE_FILES = ("models/selected.json", "metrics/select_table.md")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project committed to a fresh git + DVC repository; its DVC-cached outputs (the models,
    data/tokenized) are not there, so tokenize and train fail for want of them."""
    return make_repo(tmp_path_factory.mktemp("failing") / "repo")


def committed(repo: Path, path: str) -> bytes:
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=repo, capture_output=True, check=True).stdout


def git_status(repo: Path, *paths: str) -> str:
    return run(repo, "git", "status", "--porcelain", "--", *paths).stdout


def as_dvc_runs(stage: str, root: Path) -> dict:
    """The environment DVC gives a stage's command: DVC_STAGE and DVC_ROOT (the workspace)."""
    return {"DVC_STAGE": stage, "DVC_ROOT": str(root)}


def test_a_failed_stage_puts_back_the_tracked_outputs_dvc_removed(repo):
    (repo / "metrics/tokenize.json").unlink()  # as DVC does before it runs the stage
    (repo / "metrics/train/metrics.json").write_text("{}")  # another stage's output: not tokenize's to touch
    try:
        result = run(
            repo,
            sys.executable,
            "-m",
            "stages.tokenize",
            check=False,
            extra_env=as_dvc_runs("tokenize", repo),
        )
        assert result.returncode == 1 and "Traceback" in result.stderr  # no base model here: a real failure
        assert (
            "tokenize failed: put back from git 1 tracked file of its outputs (metrics/tokenize.json)"
            in result.stderr
        )
        assert (repo / "metrics/tokenize.json").read_bytes() == committed(repo, "metrics/tokenize.json")
        assert git_status(repo) == " M metrics/train/metrics.json\n"
    finally:
        run(repo, "git", "checkout", "--", "metrics/")


def test_a_stage_that_exits_with_its_own_message_puts_them_back_too(repo):
    # choose ends with a ParamsError (exit 2, its one-line message) when a candidate lacks select.metric
    scores = repo / "metrics/select/tiny_llama.json"  # select's output, which choose reads
    scores.write_text(json.dumps({k: v for k, v in json.loads(scores.read_text()).items() if k != "rouge_l"}))
    for path in CHOOSE_FILES:
        (repo / path).unlink()
    try:
        result = run(
            repo, sys.executable, "-m", "stages.choose", check=False, extra_env=as_dvc_runs("choose", repo)
        )
        assert (
            result.returncode == 2
            and "select.metric 'rouge_l' is not available for tiny_llama" in result.stderr
        )
        assert (
            f"choose failed: put back from git 2 tracked files of its outputs "
            f"({', '.join(sorted(CHOOSE_FILES))})" in (result.stderr)
        )
        for path in CHOOSE_FILES:
            assert (repo / path).read_bytes() == committed(repo, path), path
        assert git_status(repo) == " M metrics/select/tiny_llama.json\n"
    finally:
        run(repo, "git", "checkout", "--", "metrics/", "models/")


def test_sigterm_puts_back_the_outputs_including_half_written_ones(repo):
    (repo / TRAIN_FILES[0]).write_text('{"step": 3}')  # what a run stopped halfway leaves
    (repo / TRAIN_FILES[1]).unlink()
    log = repo / "metrics/logs/train.log"
    log.unlink(missing_ok=True)
    stage = subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=repo,
        env={**env(), **as_dvc_runs("train", repo)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not log.exists():  # written once stages/__init__.py has set up logging and the SIGTERM handler
            assert stage.poll() is None and time.monotonic() < deadline, stage.communicate()
            time.sleep(0.05)
        stage.send_signal(signal.SIGTERM)  # while the stage still imports torch and transformers
        _, stderr = stage.communicate(timeout=120)
    finally:
        stage.kill()
    assert stage.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "train failed: put back from git 2 tracked files" in stderr
    for path in TRAIN_FILES:
        assert (repo / path).read_bytes() == committed(repo, path), path
    assert git_status(repo) == ""


FORKED_CHILD = """
import multiprocessing, signal, sys, time
sys.orig_argv = [sys.executable, "-m", "stages.feedback"]  # as DVC runs a stage
import stages
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
child.start()
time.sleep(0.5)
child.terminate()  # SIGTERM, as multiprocessing.Pool.terminate() ends its workers
child.join(20)
print(child.exitcode)
"""


def test_a_process_forked_by_a_stage_dies_on_sigterm_as_by_default(tmp_path):
    # The stage itself turns SIGTERM into Terminated; a forked worker that did the same would exit 1
    # after its cleanup (and cleanlab's pool hung in join waiting on one).
    result = subprocess.run(
        [sys.executable, "-c", FORKED_CHILD],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env(), "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == str(-signal.SIGTERM)


def test_a_stage_in_a_copy_of_the_workspace_leaves_both_alone(repo, tmp_path):
    # `dvc exp run --temp` runs the stage in a copy, with DVC_ROOT naming the workspace
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (repo / "metrics/tokenize.json").unlink()
    try:
        result = run(
            repo,
            sys.executable,
            "-m",
            "stages.tokenize",
            check=False,
            extra_env=as_dvc_runs("tokenize", workspace),
        )
        assert result.returncode == 1 and "put back" not in result.stderr
        assert not (repo / "metrics/tokenize.json").exists()  # the copy is DVC's to throw away
        assert list(workspace.iterdir()) == []
    finally:
        run(repo, "git", "checkout", "--", "metrics/")


@pytest.mark.slow
def test_ctrl_c_in_dvc_exp_run_leaves_the_metrics_committed_and_the_documented_recovery_works(
    pipeline_build, tmp_path
):
    repo = tmp_path / "project"
    shutil.copytree(pipeline_build / "project", repo, symlinks=True)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "make run")
    log = repo / "metrics/logs/train.log"
    log.unlink()
    # Ctrl-C in a terminal signals the whole foreground process group: dvc and the stage it runs
    dvc = subprocess.Popen(
        ["dvc", "exp", "run", "-S", "train.epochs=5"],
        cwd=repo,
        env=env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not log.exists():
            assert dvc.poll() is None and time.monotonic() < deadline, dvc.communicate()
            time.sleep(0.1)
        assert not (repo / "models/adapter").exists()  # DVC removed train's outputs before running it
        os.killpg(dvc.pid, signal.SIGINT)
        output, _ = dvc.communicate(timeout=180)
    finally:
        dvc.kill()
    assert dvc.returncode != 0 and "KeyboardInterrupt" in output, output
    assert (
        "train failed: put back from git" in output
        and "`dvc checkout train` puts back models/adapter" in output
    ), output
    for path in TRAIN_FILES:
        assert (repo / path).read_bytes() == committed(repo, path), path
    assert git_status(repo, "metrics/") == ""
    # the recovery docs/workflows.md gives brings back the rest
    recovery = (
        (ROOT / "docs/workflows.md").read_text(encoding="utf-8").split("To recover:\n\n```bash\n", 1)[1]
    )
    for line in recovery.split("```", 1)[0].splitlines():
        run(repo, *shlex.split(line.split("#", 1)[0]))
    assert git_status(repo) == ""
    assert "Data and pipelines are up to date" in run(repo, "dvc", "status").stdout
