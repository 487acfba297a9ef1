"""Shared test fixtures. Tests are offline: nothing is downloaded, models are built from a config."""

from __future__ import annotations

import os
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
    from tuneline.records import read_jsonl

    texts = []
    for record in read_jsonl(SEEDS):
        texts += [record.get("system") or "", record["instruction"], record.get("input") or "", record["output"]]
        for user, answer in record.get("history") or []:
            texts += [user, answer]
    return [t for t in texts if t.strip()]


def build_tiny(out_dir: Path, arch: str, chat_template: str) -> Path:
    """A tiny model and tokenizer saved in `out_dir` (about 0.1M parameters, built in about a second)."""
    from tuneline.params import TinyModel
    from tuneline.tinymodels import save_tiny_model

    # Widths are multiples of 64: bitsandbytes quantises in blocks of 64, so QLoRA tests run on these too.
    spec = TinyModel(arch=arch, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_positions=512, chat_template=chat_template, pretrain_steps=0)
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


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """A temporary git + DVC copy of the project after one full `dvc repro` of the default pipeline.

    Returns (repo, first) where `first` says which stages ran, and `first["audit"]` is the file
    where each stage recorded the params keys it read. Tests that change the repo put it back.
    """
    from tests.pipeline_repo import make_repo, repro

    repo = make_repo(tmp_path_factory.mktemp("pipeline") / "project")
    audit = repo.parent / "params_reads.jsonl"
    first = repro(repo, extra_env={"TUNELINE_PARAMS_AUDIT": str(audit)})
    first["audit"] = audit
    return repo, first
