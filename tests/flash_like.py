"""A pure-torch attention that chooses its kernel as transformers' flash-attention does, for CPU tests.

There is no flash-attention on CPU, and what makes packed training go wrong under it is not the
kernel but the choice `transformers.modeling_flash_attention_utils._flash_attention_forward` makes
before calling one, in this order: a 2D padding mask -> unpad and run variable-length; the
variable-length arguments (`cu_seq_lens_q/k`, `max_length_q/k`) -> variable-length over the
batch's tokens; position ids that restart, in a batch of one row -> variable-length with the
boundaries found from them; anything else -> plain causal attention over each row. This module
makes the same choice and computes each case with SDPA, so a test of packing under it fails where
flash-attention would let packed examples attend to each other. `register()` adds it, under NAME,
through transformers' public attention and mask registries; its mask is flash-attention's own.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import flash_attention_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

# no "flash" in the name: transformers would then try to import the flash-attention package for it
NAME = "fa_like"
# How many attention calls took each path (padded, varlen, varlen_from_positions, causal), for tests to read.
CALLS: Counter = Counter()


def packed_in_one_row(position_ids: torch.Tensor | None, batch_size: int) -> bool:
    """What flash-attention's `_is_packed_sequence` says: one row whose positions are not 0, 1, 2, ..."""
    if position_ids is None or batch_size != 1 or position_ids.shape[-1] == 1:
        return False
    return bool((torch.arange(position_ids.shape[-1]) + position_ids.min() != position_ids.reshape(-1)).any())


def varlen(query, key, value, cu_seq_lens: torch.Tensor, scaling) -> torch.Tensor:
    """Causal attention within each stretch of the batch's tokens (taken row after row) that
    `cu_seq_lens` bounds; [batch, heads, length, dim] in, [batch, length, heads, dim] out."""
    batch, heads, length, dim = query.shape
    tokens = [
        x.transpose(1, 2).reshape(batch * length, x.shape[1], dim).transpose(0, 1)
        for x in (query, key, value)
    ]
    bounds = cu_seq_lens.tolist()
    out = [
        sdpa(*(t[:, a:b] for t in tokens), is_causal=True, scale=scaling, enable_gqa=True)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(out, dim=1).transpose(0, 1).reshape(batch, length, heads, dim)


def flash_like_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    position_ids=None,
    cu_seq_lens_q=None,
    max_length_q=None,
    **kwargs,
):
    """The attention function transformers calls in each layer, with flash-attention's choice of kernel."""
    if attention_mask is not None:  # flash-attention unpads: each row attends causally to its own real tokens
        CALLS["padded"] += 1
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        mask = causal & attention_mask[:, None, None, :].bool()
        return sdpa(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True).transpose(1, 2), None
    if cu_seq_lens_q is not None and max_length_q is not None:
        CALLS["varlen"] += 1
        return varlen(query, key, value, cu_seq_lens_q, scaling), None
    if packed_in_one_row(position_ids, query.shape[0]):
        CALLS["varlen_from_positions"] += 1
        (cu_seq_lens, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        return varlen(query, key, value, cu_seq_lens, scaling), None
    CALLS["causal"] += 1
    return sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=True).transpose(1, 2), None


def register() -> str:
    """Make NAME an `attn_implementation` any model can load with; returns NAME."""
    AttentionInterface.register(NAME, flash_like_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
