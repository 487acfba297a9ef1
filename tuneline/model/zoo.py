"""Stand-ins for real model families, built offline in a second: the zoo the family tests run on.

Each stand-in is a tiny random model of the family's own transformers architecture (its config
class), with a byte-level BPE tokenizer trained on the given texts that carries the family's real
special tokens, its BOS / EOS / pad convention and its published chat template
(`tuneline.model.zootemplates`), and a generation_config.json like the hub one: base models whose EOS
is not the token that ends a turn keep it so (Qwen2.5 base: <|endoftext|> vs <|im_end|>; Llama 3
base: <|end_of_text|> vs <|eot_id|>), and instruct models keep their sampling settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GenerationConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from tuneline.model import zootemplates


@dataclass(frozen=True)
class Family:
    """One family's conventions, as its hub repositories publish them."""

    config: type
    template: str
    specials: tuple[str, ...]  # special tokens, in vocabulary order
    eos: str
    end_of_turn: str  # the token the template closes an assistant turn with
    bos: str | None = None
    pad: str | None = None
    plain_tokens: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)
    generation_eos: tuple[str, ...] = ()  # generation_config.json's eos_token_id (default: eos)
    generation: dict = field(default_factory=dict)  # its other settings
    architecture: dict = field(default_factory=dict)  # config settings beyond the tiny sizes
    tie_word_embeddings: bool = True


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")
LLAMA_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
)
LLAMA_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}

FAMILIES = {
    "qwen2.5-base": Family(
        Qwen2Config,
        zootemplates.QWEN2_5,
        QWEN_SPECIALS,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        end_of_turn="<|im_end|>",
        generation={"do_sample": False, "max_new_tokens": 2048},
    ),
    "qwen2.5-instruct": Family(
        Qwen2Config,
        zootemplates.QWEN2_5,
        QWEN_SPECIALS,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        end_of_turn="<|im_end|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"),
        generation={
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "repetition_penalty": 1.05,
        },
    ),
    "qwen3": Family(
        Qwen3Config,
        zootemplates.QWEN3,
        QWEN_SPECIALS,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        end_of_turn="<|im_end|>",
        plain_tokens=("<think>", "</think>"),
        generation_eos=("<|im_end|>", "<|endoftext|>"),
        generation={"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20},
        architecture={"head_dim": 16},
    ),
    "llama3.2-base": Family(
        LlamaConfig,
        zootemplates.LLAMA3_2,
        LLAMA_SPECIALS,
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        end_of_turn="<|eot_id|>",
        generation=LLAMA_SAMPLING,
    ),
    "llama3.2-instruct": Family(
        LlamaConfig,
        zootemplates.LLAMA3_2,
        LLAMA_SPECIALS,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        end_of_turn="<|eot_id|>",
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        generation=LLAMA_SAMPLING,
    ),
    # Gemma 2 soft-caps its final logits at 30; a random tiny model's logits are far below that, so the
    # stand-in caps at 5 to make the cap change every score (scoring that ignores it fails the tests).
    "gemma2": Family(
        Gemma2Config,
        zootemplates.GEMMA2,
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        end_of_turn="<end_of_turn>",
        generation={"cache_implementation": "hybrid"},
        architecture={
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 5.0,
            "sliding_window": 64,
        },
    ),
    "phi3": Family(
        Phi3Config,
        zootemplates.PHI3,
        ("<s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|user|>", "<|end|>"),
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        end_of_turn="<|end|>",
        generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"),
        tie_word_embeddings=False,
    ),
}


def train_tokenizer(family: Family, texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` with the family's special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain_tokens])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad
    )
    fast.chat_template = family.template
    return fast


def model_config(family: Family, tokenizer: PreTrainedTokenizerFast):
    """The family's transformers config at a tiny size (widths multiples of 64, so bitsandbytes quantises
    it)."""
    return family.config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=family.tie_word_embeddings,
        # Wider than the hub's 0.02: a random 64-wide model's logits can then reach the few units that
        # let a LoRA adapter, which never touches the embeddings, make one answer token the likeliest.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **family.architecture,
    )


def generation_config(family: Family, tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """The family's generation_config.json: its EOS list and its other settings, as the hub ships them."""
    eos = [tokenizer.convert_tokens_to_ids(t) for t in family.generation_eos] or tokenizer.eos_token_id
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **family.generation,
    )


def save_standin(
    name: str, texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, seed: int = 0
) -> Path:
    """Build the stand-in of family `name` (a key of FAMILIES) with seeded random weights and save model,
    tokenizer and generation config in `out_dir`, as a hub repository holds them; return `out_dir`."""
    family = FAMILIES[name]
    tokenizer = train_tokenizer(family, texts, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, tokenizer))
    model.save_pretrained(out_dir, safe_serialization=True)
    generation_config(family, tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
