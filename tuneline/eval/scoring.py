"""Scoring a model on held-out Alpaca records: the one module select and evaluate share.

Loss is the mean cross-entropy over answer tokens only (prompt tokens carry no loss), and
perplexity its exponential, from the model's own logits (its final soft-capping or logit
scale included). Generation is greedy, with nothing taken from a hub generation config, stops at
the template's end of turn as well as the EOS, and is batched (left padding).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from tuneline.data.alpaca import to_messages
from tuneline.eval.textmetrics import corpus_scores, record_scores
from tuneline.model.generation import generating_with, greedy_config, stop_ids
from tuneline.model.templates import render
from tuneline.model.tokenization import IGNORE, collate, encode

# Answer positions scored at once: their fp32 logits are LOSS_CHUNK x vocabulary (1 GB at 152k words).
LOSS_CHUNK = 2048


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last layer's (normed) hidden states of each input token, without the language-model head.

    A peft model runs with its adapter: LoRA layers sit inside the decoder; P-tuning's virtual
    tokens are prepended here as peft's own forward does, and their positions cut off again.
    """
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = body.get_decoder()
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    embeds = model.word_embeddings(input_ids)
    prompts = model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)
    mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], prompts.shape[1]), attention_mask], dim=1)
    hidden = decoder(
        inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, use_cache=False
    ).last_hidden_state
    return hidden[:, prompts.shape[1] :]


def output_head(model):
    """The language-model head as the model's own forward applies it to the last hidden states: the
    linear head, then the model's logit transform, which changes every loss: Cohere's `logit_scale`
    (multiplied), Granite's `logits_scaling` (divided), Gemma 2's `final_logit_softcapping`
    (cap * tanh(logits / cap)). `answer_losses` checks the result against the model's own logits."""
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = body.config.get_text_config()
    linear = model.get_output_embeddings()
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden)
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return head


def check_head(
    model, head, input_ids: torch.Tensor, length: int, hidden: torch.Tensor, positions: int = 32
) -> None:
    """Fail when `head` on the first row's hidden states (of its first `length` tokens, the rest being
    padding) does not give the model's own logits: an
    architecture that transforms its logits in a way `output_head` does not know would otherwise be
    scored with a wrong loss, silently."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return  # its own logits include the virtual tokens' positions; its head is the base's, checked there
    n = min(positions, length)
    own = model(input_ids=input_ids[:1, :n], use_cache=False).logits[0].float()
    ours = head(hidden[:1, :n])[0].float()
    if (own - ours).abs().max() > 1e-2 * own.abs().max() + 1e-3:
        raise ValueError(
            f"scoring: the {model.config.model_type} model's own logits differ from its head's: it "
            "transforms its logits in a way tuneline.eval.scoring.output_head does not apply"
        )


def chunked_token_losses(
    hidden: torch.Tensor, labels: torch.Tensor, head, chunk: int = LOSS_CHUNK
) -> torch.Tensor:
    """Cross-entropy of each labelled position (labels already shifted to the predicting position):
    the head runs on `chunk` positions at a time, so memory never holds batch x length x vocabulary."""
    rows = hidden[labels != IGNORE]
    targets = labels[labels != IGNORE]
    losses = [
        torch.nn.functional.cross_entropy(
            head(rows[i : i + chunk]).float(), targets[i : i + chunk], reduction="none"
        )
        for i in range(0, len(targets), chunk)
    ]
    return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def answer_losses(
    model,
    tokenizer,
    records: list[dict],
    template: str,
    batch_size: int,
    max_length: int,
    chunk: int = LOSS_CHUNK,
) -> list[tuple[float, int]]:
    """(summed answer-token loss, answer-token count) of each record.

    Only answer positions go through the language-model head (with the model's logit transform:
    `output_head`), `chunk` at a time: the full fp32 logits of a batch (8 x 2048 x 152k words = 10 GB)
    are never made.
    """
    model.eval()
    device = next(model.parameters()).device
    head = output_head(model)
    encoded = []
    for record in records:
        ids, labels = encode(tokenizer, record, template, train_on_prompt=False)
        encoded.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    out = []
    for i in tqdm(range(0, len(encoded), batch_size), desc="loss", leave=False):
        batch = {
            k: v.to(device) for k, v in collate(encoded[i : i + batch_size], tokenizer.pad_token_id).items()
        }
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        if i == 0:
            check_head(model, head, batch["input_ids"], int(batch["attention_mask"][0].sum()), hidden)
        # position t predicts token t + 1: the label of position t is the next token's
        labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
        losses = chunked_token_losses(hidden, labels, head, chunk)
        row = torch.arange(labels.shape[0], device=device).unsqueeze(1).expand_as(labels)[labels != IGNORE]
        sums = torch.zeros(labels.shape[0], device=device).index_add_(0, row, losses)
        counts = (labels != IGNORE).sum(1)
        out += list(zip(sums.tolist(), counts.tolist()))  # one device-to-host copy each, not one per record
    return out


def until_stop(ids: list[int], stops: list[int]) -> list[int]:
    """The tokens a sequence really produced: up to and including its first stop token. A finished
    sequence in a batch is padded until the longest is done; that padding was never generated."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def generate_ids(
    model, tokenizer, records: list[dict], template: str, batch_size: int, max_new_tokens: int
) -> list[list[int]]:
    """The greedy answer tokens of each record's prompt (ending with the stop token when one came),
    batched with left padding."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [
        render(tokenizer, to_messages(r, with_answer=False), template, add_generation_prompt=True)
        for r in records
    ]
    config = greedy_config(stop_ids(model, tokenizer, template), tokenizer.pad_token_id, max_new_tokens)
    stops = config.eos_token_id
    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
            batch = tokenizer(
                prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            with generating_with(model, config):
                output = model.generate(**batch, generation_config=config)
            answers += [until_stop(row, stops) for row in output[:, batch["input_ids"].shape[1] :].tolist()]
    finally:
        tokenizer.padding_side = side
    return answers


def generate(
    model, tokenizer, records: list[dict], template: str, batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers to the records' prompts, batched with left padding."""
    ids = generate_ids(model, tokenizer, records, template, batch_size, max_new_tokens)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def score(
    model,
    tokenizer,
    records: list[dict],
    template: str,
    batch_size: int,
    max_new_tokens: int,
    generation_samples: int,
    max_length: int = 2048,
) -> tuple[dict, list[dict]]:
    """Aggregate metrics and per-record scores: loss/perplexity on all records, generation metrics
    on the first `generation_samples` (records are in a fixed order, so the sample is stable)."""
    # Records longer than the model's context are cut at it rather than crash the forward pass.
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length) or max_length)
    losses = answer_losses(model, tokenizer, records, template, batch_size, max_length)
    total, count = sum(loss for loss, _ in losses), sum(n for _, n in losses)
    loss = total / max(count, 1)
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "answer_tokens": count,
        "records": len(records),
    }
    sample = records[:generation_samples]
    start = time.perf_counter()
    answers = generate(model, tokenizer, sample, template, batch_size, max_new_tokens) if sample else []
    elapsed = time.perf_counter() - start
    metrics.update(corpus_scores(answers, [r["output"] for r in sample]))
    per_record = []
    for i, (record, (summed, n)) in enumerate(zip(records, losses)):
        row = {"index": i, "id": record.get("id"), "loss": summed / max(n, 1), "answer_tokens": n}
        if i < len(answers):
            row.update(answer=answers[i], **record_scores(answers[i], record["output"]))
        per_record.append(row)
    metrics["generation_s"] = elapsed
    return metrics, per_record
