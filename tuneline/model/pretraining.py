"""Pretraining on raw text: the causal-LM objective over fixed-length blocks of a text corpus.

The `models` stage pretrains the small offline candidates from scratch on the shipped corpus
(`models.corpus_dir`), and the optional `pretrain` stage continues pretraining the chosen base on
crawled documents. Both run through the train stage's own code (`training.fit`: the Trainer,
checkpoints, DVCLive curves); only the data differs: blocks of text whose labels are the tokens.

The decontamination check of pretraining text lives in `tuneline.eval.decontamination` (no torch needed).
"""

from __future__ import annotations

import hashlib
import math
from functools import partial
from pathlib import Path

import torch

from tuneline.common.params import Train
from tuneline.common.records import InputError
from tuneline.model.tokenization import collate
from tuneline.model.training import fit, training_arguments


def corpus_files(corpus_dir: str | Path) -> list[Path]:
    """The corpus's text files (`*.txt`), in a stable order."""
    files = sorted(Path(corpus_dir).rglob("*.txt"))
    if not files:
        raise InputError(
            f"models: no *.txt files in {corpus_dir} (models.corpus_dir); put the pretraining text there"
        )
    return files


def file_hashes(files: list[Path]) -> dict[str, str]:
    """Each file's md5, by path: what the model card and the decontamination check name."""
    return {f.as_posix(): hashlib.md5(f.read_bytes()).hexdigest() for f in files}


def text_blocks(tokenizer, texts: list[str], block_size: int) -> list[list[int]]:
    """The texts tokenized, each ended by the end-of-sequence token, concatenated and cut into
    blocks of `block_size` tokens (the last one may be shorter; nothing is left out)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [ids[i : i + block_size] for i in range(0, len(ids), block_size)]


def split_blocks(blocks: list[list[int]], heldout_fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held-out): every k-th block is held out, so both spread over the whole corpus."""
    if heldout_fraction <= 0 or len(blocks) < 2:
        return blocks, []
    every = max(2, round(1 / heldout_fraction))
    return (
        [b for i, b in enumerate(blocks) if i % every != every - 1],
        [b for i, b in enumerate(blocks) if i % every == every - 1],
    )


def as_examples(blocks: list[list[int]]) -> list[dict]:
    """Blocks as training examples: every token is a label (the collator masks the padding)."""
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


@torch.no_grad()
def heldout_loss(model, blocks: list[list[int]], pad_token_id: int, batch_size: int) -> float:
    """Mean next-token loss over the held-out blocks (nan when there are none)."""
    if not blocks:
        return math.nan
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for i in range(0, len(blocks), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(as_examples(blocks[i : i + batch_size]), pad_token_id).items()
        }
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / max(count, 1)


def run_params(
    *,
    learning_rate: float,
    batch_size: int,
    epochs: float = 1.0,
    max_steps: int = -1,
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    logging_steps: int = 10,
    save_steps: int = 10**9,
    compute_dtype: str = "auto",
    grad_accum: int = 1,
) -> Train:
    """Pretraining's settings as the train stage's code takes them: full training of every weight,
    with the Trainer's defaults for what pretraining does not set (no LoRA, adamw, no switches)."""
    return Train(
        method="full",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules="all-linear",
        use_dora=False,
        use_rslora=False,
        ptuning_virtual_tokens=0,
        compute_dtype=compute_dtype,
        gradient_checkpointing=False,
        attn_implementation="sdpa",
        optim="adamw_torch",
        use_liger_kernel=False,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        eval_batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        neftune_noise_alpha=0.0,
        wise_ft=1.0,
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=logging_steps,
        launcher="python",
        accelerate_config="",
        lr_scheduler="linear",
        profile="tiny",
        hub=None,
    )


def pretrain(
    model,
    tokenizer,
    train_blocks: list[list[int]],
    p: Train,
    checkpoints: Path,
    seed: int,
    callbacks: list,
    save_to: Path | None = None,
) -> tuple:
    """Train `model` on the blocks with the causal-LM objective; return (model, metrics)."""
    args = training_arguments(p, checkpoints, seed, has_eval=False)
    return fit(
        model,
        tokenizer,
        args,
        as_examples(train_blocks),
        None,
        partial(collate, pad_token_id=tokenizer.pad_token_id),
        checkpoints,
        callbacks,
        save_to,
    )
