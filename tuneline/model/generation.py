"""Greedy generation that stops where a chat model's answer ends: the one config select, evaluate and export
use.

A model's answer ends at its template's end-of-turn token as well as at its EOS, and decoding is
greedy with nothing inherited from the model's hub generation config; the exported
generation_config.json is the same config, so `tuneline serve` and plain `generate` decode alike.
"""

from __future__ import annotations

from contextlib import contextmanager

from tuneline.model.templates import end_of_turn


def stop_ids(model, tokenizer, template: str) -> list[int]:
    """The tokens that end an answer: the token `template` closes an assistant turn with, the
    tokenizer's end of sequence and the model's generation config ones (instruct models often list
    several, e.g. Llama 3's <|eot_id|> and <|end_of_text|>). A base model's EOS is usually not its
    template's end of turn (Qwen2.5 base: <|endoftext|> vs <|im_end|>), and a model trained on the
    template ends its answers with the latter."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    turn_end = end_of_turn(tokenizer, template)
    turn_id = tokenizer.convert_tokens_to_ids(turn_end) if turn_end else None
    return sorted({t for t in [turn_id, tokenizer.eos_token_id, *configured] if t is not None})


def greedy_config(stops: list[int], pad_token_id: int | None, max_new_tokens: int | None = None):
    """Greedy decoding, every setting that could change it written out: no sampling, one beam,
    no repetition penalty, stopping at `stops`. It replaces a model's own generation config (a
    hub one sets temperature, top-p, repetition penalty), so nothing is inherited from it."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        eos_token_id=stops,
        pad_token_id=pad_token_id,
        max_new_tokens=max_new_tokens,
    )


@contextmanager
def generating_with(model, config):
    """`model` generating with `config` as its own generation config for the block: transformers fills
    what a passed config leaves unset from the model's own, so a hub model's sampling settings would
    leak into greedy decoding."""
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = body.generation_config
    body.generation_config = config
    try:
        yield config
    finally:
        body.generation_config = saved
