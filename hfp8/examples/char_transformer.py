"""A GPT-style character language model: the model of the training benchmark's language task
and the suite's causal-LM tests (``--arch hfp8.examples:char_transformer`` builds one).

``tokens (N, T) int64 -> logits (N, T, vocabulary)``: token and position embeddings, ``layers``
pre-norm blocks (LayerNorm, fused q/k/v projection, causal scaled-dot-product attention, output
projection; LayerNorm, GELU MLP of 4x the width), a final LayerNorm and a Linear head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

__all__ = ["CharTransformer", "char_transformer"]


class CausalBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(functional.gelu(self.up(self.norm2(x))))


class CharTransformer(nn.Module):
    """Sequences of up to ``context`` tokens of a ``vocabulary``-symbol alphabet."""

    def __init__(self, vocabulary: int, width: int = 128, heads: int = 4, layers: int = 2,
                 context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(CausalBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def char_transformer(vocabulary: int = 128, width: int = 128, heads: int = 4, layers: int = 2,
                     context: int = 64) -> CharTransformer:
    """A :class:`CharTransformer` (untrained; load a state dict into it); the defaults take
    7-bit ASCII codes as tokens."""
    return CharTransformer(vocabulary, width, heads, layers, context)
