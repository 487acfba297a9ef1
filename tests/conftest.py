"""Shared test fixtures. Tests are offline: nothing is downloaded, models are built from a config."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Set before transformers, tokenizers or dvc are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["DVC_NO_ANALYTICS"] = "1"
# One torch thread per process: tests run stages, servers and clients side by side on 2 cores,
# and oversubscribed threads made tiny-model steps 10x slower there.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "data" / "seeds" / "seeds.jsonl"


def seed_texts() -> list[str]:
    """The text of the bundled seed records, to train a tiny tokenizer on."""
    from tuneline.common.records import read_jsonl

    texts = []
    for record in read_jsonl(SEEDS):
        texts += [
            record.get("system") or "",
            record["instruction"],
            record.get("input") or "",
            record["output"],
        ]
        for user, answer in record.get("history") or []:
            texts += [user, answer]
    return [t for t in texts if t.strip()]


def build_tiny(out_dir: Path, arch: str, chat_template: str) -> Path:
    """A tiny model and tokenizer saved in `out_dir` (about 0.1M parameters, built in about a second)."""
    from tuneline.common.params import TinyModel
    from tuneline.model.tinymodels import save_tiny_model

    # Widths are multiples of 64: bitsandbytes quantises in blocks of 64, so QLoRA tests run on these too.
    spec = TinyModel(
        arch=arch,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_positions=512,
        chat_template=chat_template,
        pretrain_steps=0,
    )
    save_tiny_model(spec, seed_texts(), vocab_size=512, seed=0, out_dir=out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2-style model with a ChatML template, saved with save_pretrained."""
    return build_tiny(tmp_path_factory.mktemp("tiny_qwen"), "qwen2", "chatml")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama-style model with a Llama 3 template (it has a bos token), saved with save_pretrained."""
    return build_tiny(tmp_path_factory.mktemp("tiny_llama"), "llama", "llama3")


@pytest.fixture(scope="session")
def tuned_project(tmp_path_factory, tiny_model_dir) -> Path:
    """A project taken through tokenize → train (LoRA) → evaluate → export, training on its test split."""
    from tests.tuned_project import make_tuned_project

    return make_tuned_project(tmp_path_factory.mktemp("tuned_project"), tiny_model_dir)


# The default pipeline's full `dvc repro` (about 5 minutes on 2 cores) runs once per test run, in
# the background from the moment tests that need it are collected, while other tests run. Each
# xdist worker (or the one process) then works on its own copy, so tests that change the
# repository and put it back never meet another worker's changes.
PIPELINE_BUILD_TIMEOUT_S = 3600


def pipeline_build_dir(config) -> Path:
    """Where this test run builds the pipeline: the run's base temporary directory, which the
    xdist workers' own temporary directories are inside (pytest keeps the last three runs')."""
    base = config._tmp_path_factory.getbasetemp()
    return (base.parent if hasattr(config, "workerinput") else base) / "pipeline-build"


def pytest_collection_finish(session):
    """Start the pipeline build when a collected test needs it; the first worker to get here starts it."""
    if not any("pipeline_build" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    build = pipeline_build_dir(session.config)
    try:
        build.mkdir()
    except FileExistsError:
        return  # another worker started it
    log = open(build / "build.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.pipeline_repo", str(build)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (build / "pid").write_text(str(proc.pid))
    session.config.pipeline_builder = proc


def pytest_sessionfinish(session, exitstatus):
    """The worker that started the build waits for it (another worker may still need it), unless
    the run was interrupted: then the build is stopped."""
    proc = getattr(session.config, "pipeline_builder", None)
    if proc is None or proc.poll() is not None:
        return
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.wait(timeout=PIPELINE_BUILD_TIMEOUT_S)


def builder_running(build: Path) -> bool:
    """Whether the build's process is still at work (one whose pid is not written yet counts)."""
    try:
        pid = int((build / "pid").read_text())
    except (FileNotFoundError, ValueError):
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; its parent has not collected it yet


@pytest.fixture(scope="session")
def pipeline_build(request) -> Path:
    """The pipeline build itself (waited for): the project right after its first full `dvc repro`,
    never changed by a test. Tests only read it; to change a repository, use `pipeline`."""
    build = pipeline_build_dir(request.config)
    done = build / "first.json"
    deadline = time.monotonic() + PIPELINE_BUILD_TIMEOUT_S

    def log_tail() -> str:
        log = build / "build.log"
        return log.read_text()[-6000:] if log.exists() else "(no log)"

    while not done.exists():
        if not build.exists():
            raise RuntimeError(
                "the pipeline build was never started (pytest_collection_finish in tests/conftest.py)"
            )
        if not builder_running(build) and not done.exists():
            raise RuntimeError(f"the pipeline build in {build} failed:\n{log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the pipeline build in {build} took over {PIPELINE_BUILD_TIMEOUT_S} s:\n{log_tail()}"
            )
        time.sleep(2)
    return build


@pytest.fixture(scope="session")
def pipeline(pipeline_build, tmp_path_factory):
    """A temporary git + DVC copy of the project after one full `dvc repro` of the default pipeline.

    Returns (repo, first) where `first` says which stages ran, and `first["audit"]` is the file
    where each stage recorded the params keys it read. Tests that change the repo put it back
    (its persistent caches keep what such a change added: compare outputs with `pipeline_build`).
    """
    build, done = pipeline_build, pipeline_build / "first.json"
    mine = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(build / "project", mine / "project", symlinks=True)
    shutil.copy2(build / "params_reads.jsonl", mine / "params_reads.jsonl")
    first = {key: set(stages) for key, stages in json.loads(done.read_text()).items()}
    first["audit"] = mine / "params_reads.jsonl"
    return mine / "project", first
