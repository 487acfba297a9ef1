"""Small base models built offline: the stand-ins for hub models in the default pipeline and tests.

A byte-level BPE tokenizer is trained on the bundled text (so any script, Chinese included,
encodes without unknown tokens), and each architecture is built from a config with a fixed seed.
The `models` stage then pretrains them and saves them with `save_pretrained`, so everything
downstream loads them through the real `from_pretrained(path)` path, exactly as it would a hub model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from tuneline.common.params import TinyModel
from tuneline.model.templates import TEMPLATE_TOKENS, TEMPLATES

PAD = "<|pad|>"
EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, chat_template: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the special tokens of `chat_template`."""
    specials, end_of_turn = TEMPLATE_TOKENS[chat_template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=end_of_turn or EOS,
        bos_token="<|begin_of_text|>" if chat_template == "llama3" else None,
    )
    fast.chat_template = TEMPLATES[chat_template]
    return fast


def model_config(spec: TinyModel, tokenizer: PreTrainedTokenizerFast):
    """The transformers config of a tiny architecture."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    if spec.arch == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common)


def build_tiny_model(spec: TinyModel, tokenizer: PreTrainedTokenizerFast, seed: int):
    """The model of `spec` built from its config with seeded random weights, its generation
    config ending answers at the tokenizer's end-of-turn token."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_model(spec: TinyModel, texts: Iterable[str], vocab_size: int, seed: int, out_dir) -> int:
    """Train a tokenizer on `texts`, build the model of `spec` with random weights and save both in
    `out_dir` (tests and benches; the `models` stage pretrains before saving). Return the parameter count."""
    tokenizer = train_tokenizer(texts, vocab_size, spec.chat_template)
    model = build_tiny_model(spec, tokenizer, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
