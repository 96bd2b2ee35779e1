"""A GPT-style decoder (pre-norm blocks: separate q/k/v/o projections, causal
scaled-dot-product attention, GELU MLP of 4x the width), built at the sizes the scaling
benchmark measures. Random weights, seeded: the cost of PTQ does not depend on training.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# name -> (width, layers, heads); vocabulary 4096, context 128. Parameters: about 12 width^2
# per block plus 2 x 4096 x width for the embedding and the head.
SIZES = {"10M": (384, 5, 6), "40M": (640, 8, 10), "150M": (1024, 12, 16)}
VOCAB, CONTEXT = 4096, 128


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        normed = self.norm1(x)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (projection(normed).reshape(shape).transpose(1, 2)
                   for projection in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Decoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, vocab: int = VOCAB,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def decoder(size: str, seed: int = 0) -> Decoder:
    """The decoder of ``size`` (a key of ``SIZES``), seeded random weights, eval mode."""
    torch.manual_seed(seed)
    return Decoder(*SIZES[size]).eval()


def token_batches(count: int = 8, batch: int = 4, length: int = CONTEXT, seed: int = 1):
    """``count`` batches of ``batch`` x ``length`` random token ids."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=generator) for _ in range(count)]
