"""Scoring a model on held-out Alpaca records: the one module select and evaluate share.

Loss is the mean cross-entropy over answer tokens only (prompt tokens carry no loss), and
perplexity its exponential. Generation is greedy and batched (left padding).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from tuneline.templates import render, to_messages
from tuneline.textmetrics import corpus_scores, record_scores
from tuneline.tokenization import IGNORE, collate, encode


@torch.no_grad()
def answer_losses(model, tokenizer, records: list[dict], template: str, batch_size: int, max_length: int) -> list[tuple[float, int]]:
    """(summed answer-token loss, answer-token count) of each record."""
    model.eval()
    device = next(model.parameters()).device
    encoded = []
    for record in records:
        ids, labels = encode(tokenizer, record, template, train_on_prompt=False)
        encoded.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    out = []
    for i in tqdm(range(0, len(encoded), batch_size), desc="loss", leave=False):
        batch = {k: v.to(device) for k, v in collate(encoded[i : i + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1] :].float()  # P-tuning prepends virtual tokens
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(labels.shape)
        mask = labels != IGNORE
        out += [(float(loss[j][mask[j]].sum()), int(mask[j].sum())) for j in range(labels.shape[0])]
    return out


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's end of sequence and the model's generation
    config ones (instruct models often list several, e.g. Llama 3's <|eot_id|> and <|end_of_text|>)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({t for t in [tokenizer.eos_token_id, *configured] if t is not None})


def until_stop(ids: list[int], stops: list[int]) -> list[int]:
    """The tokens a sequence really produced: up to and including its first stop token. A finished
    sequence in a batch is padded until the longest is done; that padding was never generated."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def generate_ids(model, tokenizer, records: list[dict], template: str, batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """The greedy answer tokens of each record's prompt (ending with the stop token when one came),
    batched with left padding."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [render(tokenizer, to_messages(r, with_answer=False), template, add_generation_prompt=True) for r in records]
    stops = stop_ids(model, tokenizer)
    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
            batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
            )
            answers += [until_stop(row, stops) for row in output[:, batch["input_ids"].shape[1] :].tolist()]
    finally:
        tokenizer.padding_side = side
    return answers


def generate(model, tokenizer, records: list[dict], template: str, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to the records' prompts, batched with left padding."""
    ids = generate_ids(model, tokenizer, records, template, batch_size, max_new_tokens)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def score(model, tokenizer, records: list[dict], template: str, batch_size: int, max_new_tokens: int,
          generation_samples: int, max_length: int = 2048) -> tuple[dict, list[dict]]:
    """Aggregate metrics and per-record scores: loss/perplexity on all records, generation metrics
    on the first `generation_samples` (records are in a fixed order, so the sample is stable)."""
    # Records longer than the model's context are cut at it rather than crash the forward pass.
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length) or max_length)
    losses = answer_losses(model, tokenizer, records, template, batch_size, max_length)
    total, count = sum(l for l, _ in losses), sum(n for _, n in losses)
    loss = total / max(count, 1)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "answer_tokens": count, "records": len(records)}
    sample = records[:generation_samples]
    start = time.perf_counter()
    answers = generate(model, tokenizer, sample, template, batch_size, max_new_tokens) if sample else []
    elapsed = time.perf_counter() - start
    metrics.update(corpus_scores(answers, [r["output"] for r in sample]))
    per_record = []
    for i, (record, (l, n)) in enumerate(zip(records, losses)):
        row = {"index": i, "id": record.get("id"), "loss": l / max(n, 1), "answer_tokens": n}
        if i < len(answers):
            row.update(answer=answers[i], **record_scores(answers[i], record["output"]))
        per_record.append(row)
    metrics["generation_s"] = elapsed
    return metrics, per_record
