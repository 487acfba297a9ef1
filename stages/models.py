"""Build and pretrain the small offline base models that stand in for hub models.

Reads:  models.corpus_dir (the shipped pretraining text, `*.txt`), base.seeds and base.site_dir
        (more text for the tokenizer only), `models:`.
Writes: base.base_models_dir/<name>/ for each entry of models.tiny: config, safetensors weights,
        tokenizer with its chat template and pretraining.json (corpus files and their md5, steps,
        losses), all loadable with `from_pretrained(path)`; base.metrics_dir/models.json (per
        model: parameters, pretraining tokens, held-out loss before and after) and DVCLive curves
        in base.metrics_dir/models/<name>/.
Run:    python -m stages.models
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import lxml.html
from dvclive import Live
from transformers.integrations import DVCLiveCallback

from stages import run
from tuneline.common import params, timings
from tuneline.common.records import read_jsonl, write_json
from tuneline.model.pretraining import (
    corpus_files,
    file_hashes,
    heldout_loss,
    pretrain,
    run_params,
    split_blocks,
    text_blocks,
)
from tuneline.model.tinymodels import build_tiny_model, train_tokenizer


def tokenizer_texts(seeds_path: str, site_dir: str) -> list[str]:
    """Bundled text the tokenizer also learns from, so every script in the data (Chinese included)
    encodes compactly: seed records, then the visible text of the site pages. Models never train on it."""
    texts = []
    for record in read_jsonl(seeds_path):
        texts.append(record.get("system") or "")
        for user, answer in record.get("history") or []:
            texts += [user, answer]
        texts += [record["instruction"], record.get("input") or "", record["output"]]
    for page in sorted(Path(site_dir).rglob("*.html")):
        texts.append(lxml.html.fromstring(page.read_bytes()).text_content())
    return [t for t in texts if t.strip()]


def main() -> None:
    base, p = params.load("base", "models")
    files = corpus_files(p.corpus_dir)
    corpus = [f.read_text(encoding="utf-8") for f in files]
    tokenizer_extra = tokenizer_texts(base.seeds, base.site_dir)
    out_root = Path(base.base_models_dir)
    shutil.rmtree(out_root, ignore_errors=True)
    metrics, stage_timings = {}, {}
    for name, spec in p.tiny.items():
        start = time.perf_counter()
        tokenizer = train_tokenizer(corpus + tokenizer_extra, p.vocab_size, spec.chat_template)
        model = build_tiny_model(spec, tokenizer, base.seed)
        train_blocks, heldout = split_blocks(text_blocks(tokenizer, corpus, p.block_size), p.heldout_fraction)
        before = heldout_loss(model, heldout, tokenizer.pad_token_id, p.batch_size)
        train_loss, result = math.nan, {}
        if spec.pretrain_steps:
            live = Live(
                dir=str(Path(base.metrics_dir) / "models" / name),
                save_dvc_exp=False,
                dvcyaml=None,
                report=None,
            )
            # A rerun starts over (pretraining is short). The folder's name is fixed: DVCLive writes it
            # into metrics/models/<name>/params.yaml, which a random temporary name would change every run.
            checkpoints = Path(base.cache_dir) / "checkpoints" / f"models-{name}"
            shutil.rmtree(checkpoints, ignore_errors=True)
            settings = run_params(
                learning_rate=p.learning_rate,
                batch_size=p.batch_size,
                max_steps=spec.pretrain_steps,
                warmup_ratio=p.warmup_ratio,
                logging_steps=p.logging_steps,
                compute_dtype="float32",
            )
            model, result = pretrain(
                model, tokenizer, train_blocks, settings, checkpoints, base.seed, [DVCLiveCallback(live=live)]
            )
            shutil.rmtree(checkpoints, ignore_errors=True)
            train_loss = result.get("train_loss", math.nan)
        after = heldout_loss(model, heldout, tokenizer.pad_token_id, p.batch_size)
        seconds = time.perf_counter() - start
        info = {
            "corpus_dir": p.corpus_dir,
            "corpus_files": file_hashes(files),
            "pretrain_steps": spec.pretrain_steps,
            "pretrain_tokens": spec.pretrain_steps * p.batch_size * p.block_size,
            "train_loss": round(train_loss, 4),
            "heldout_loss_before": round(before, 4),
            "heldout_loss": round(after, 4),
        }
        out_dir = out_root / name
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        write_json(out_dir / "pretraining.json", info)
        parameters = sum(x.numel() for x in model.parameters())
        metrics[name] = {
            "parameters": parameters,
            **{k: v for k, v in info.items() if k not in ("corpus_dir", "corpus_files")},
        }
        stage_timings[name] = {"seconds": round(seconds, 1), **timings.split(result)[1]}
        print(
            f"models: {name} ({spec.arch}, {parameters / 1e6:.2f}M parameters): pretrained "
            f"{spec.pretrain_steps} steps "
            f"on {len(files)} files, held-out loss {before:.3f} -> {after:.3f} in {seconds:.0f} s"
        )
    write_json(Path(base.metrics_dir) / "models.json", metrics)
    timings.write(base.metrics_dir, "models", stage_timings)


if __name__ == "__main__":
    run(main)
