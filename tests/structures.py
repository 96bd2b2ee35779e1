"""Small stand-ins, built inside the suite, for the structures of real models nobody here
wrote: Conv2d subclasses with their own forward (EfficientNet's TF-style same padding), PReLU
and tuple heads (MTCNN), interpolate/permute/view heads (RetinaFace), dict inputs with an
attention mask and a BERT-like encoder block (MiniLM)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class SamePadConv2d(nn.Conv2d):
    """TensorFlow "SAME" padding computed in forward, then F.conv2d (as EfficientNet-Lite)."""

    def forward(self, x):
        height, width = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(height / sh) - 1) * sh + kh - height, 0)
        pad_w = max((math.ceil(width / sw) - 1) * sw + kw - width, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SamePadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SamePadConv2d(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = SamePadConv2d(8, 8, 3, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        x = F.relu6(self.bn2(self.depthwise(x)))
        x = self.project(x).mean((2, 3))
        return self.fc(x)


class TupleHeads(nn.Module):
    """PReLU features, a transpose+view flatten, and three heads returned as a tuple."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 8, 3), nn.PReLU(8)
        self.conv2, self.prelu2 = nn.Conv2d(8, 16, 3), nn.PReLU(16)
        self.fc, self.prelu3 = nn.Linear(16 * 4 * 4, 32), nn.PReLU(32)
        self.boxes, self.scores, self.marks = nn.Linear(32, 4), nn.Linear(32, 2), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, ceil_mode=True)
        x = self.prelu2(self.conv2(x))
        x = x.transpose(3, 2).contiguous()
        x = self.prelu3(self.fc(x.view(x.size(0), -1)))
        return self.marks(x), self.boxes(x), F.softmax(self.scores(x), dim=1)


class PyramidHeads(nn.Module):
    """Two levels merged by interpolate, per-level heads with permute/view, dict output."""

    def __init__(self):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1))
        self.down2 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1))
        self.lateral = nn.Conv2d(8, 8, 1)
        self.cls = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)])
        self.box = nn.ModuleList([nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)])

    def forward(self, x):
        level1 = self.down1(x)
        level2 = self.down2(level1)
        up = F.interpolate(level2, size=[level1.size(2), level1.size(3)], mode="nearest")
        level1 = self.lateral(level1) + up
        features = [level1, level2]
        cls = torch.cat([self.cls[i](f).permute(0, 2, 3, 1).contiguous().view(f.shape[0], -1, 2)
                         for i, f in enumerate(features)], dim=1)
        box = torch.cat([self.box[i](f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, 4)
                         for i, f in enumerate(features)], dim=1)
        return {"scores": F.softmax(cls, dim=-1), "boxes": box}


class TinyEncoder(nn.Module):
    """A BERT-like encoder: embeddings, one attention block computing QK^T and attention x V
    with explicit matmuls, one with scaled_dot_product_attention, GELU feed-forward, LayerNorm,
    and a mask that hides padded tokens. Called as ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self, vocab=50, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(16, width)
        self.blocks = nn.ModuleList([_Block(width, heads, explicit=True),
                                     _Block(width, heads, explicit=False)])
        self.norm = nn.LayerNorm(width)
        self.pool = nn.Linear(width, width)

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        for block in self.blocks:
            x = block(x, additive)
        x = self.norm(x)
        return {"last_hidden_state": x, "pooled": torch.tanh(self.pool(x[:, 0]))}


class _Block(nn.Module):
    def __init__(self, width, heads, explicit):
        super().__init__()
        self.heads, self.explicit = heads, explicit
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.output = nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def _split(self, x):
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x, additive_mask):
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        if self.explicit:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + additive_mask
            context = scores.softmax(-1) @ v
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
        context = context.transpose(1, 2).reshape(x.shape)
        x = self.norm1(x + self.output(context))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


def token_batches(count=3, batch=4, length=10, vocab=50, seed=0):
    """Dict batches of random token ids whose last positions are padding (mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.int64)
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
        for row, keep in enumerate(lengths):
            mask[row, keep:] = 0
            ids[row, keep:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches
