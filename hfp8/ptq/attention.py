"""Scaled-dot-product attention computed by its definition, so that each operand can be rounded
(:mod:`hfp8.ptq.quantizers` rounds query, key, softmax probabilities and value)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["attention_by_definition"]


def attention_by_definition(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                            scale=None, enable_gqa=False, round_operand=None):
    """``softmax(q k^T * scale + mask) v`` as PyTorch documents scaled_dot_product_attention,
    with ``round_operand(name, tensor)`` applied to query, key, probs and value."""
    round_operand = round_operand or (lambda name, x: x)
    length, source = query.size(-2), key.size(-2)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        repeats = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
    scores = torch.matmul(round_operand("query", query),
                          round_operand("key", key).transpose(-2, -1)) * factor
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = nn.functional.dropout(probs, dropout_p)
    return torch.matmul(round_operand("probs", probs), round_operand("value", value))
