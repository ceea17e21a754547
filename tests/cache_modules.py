"""Modules with buffers that are caches, placeholders or quantization state, shared by the engine and ModeCheck tests.

Written the way language-model and deployment code writes them: a rotary table, a causal mask and an ALiBi bias kept
for the longest sequence seen in non-persistent buffers and rebuilt larger for a longer one; a BatchNorm beside them
(a statistic, which evaluation must not change); and a network prepared for quantization-aware training.
"""

from __future__ import annotations

import warnings

import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HEADS = 20, 8, 2


class Rotary(nn.Module):
    """cos/sin for the longest sequence seen, rebuilt larger when a longer one arrives (GPT-NeoX, Llama v1 style)."""

    def __init__(self, dim: int = DIM, length: int = 4) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim), persistent=False)
        self.build(length)

    def build(self, length: int) -> None:
        t = torch.arange(length, dtype=self.inv_freq.dtype)
        freqs = torch.cat([torch.outer(t, self.inv_freq)] * 2, -1)
        self.register_buffer("cos_cached", freqs.cos(), persistent=False)
        self.register_buffer("sin_cached", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n > self.cos_cached.shape[0]:
            self.build(n)
        return x * self.cos_cached[:n] + x.flip(-1) * self.sin_cached[:n]


class CausalAttention(nn.Module):
    """Attention with a causal mask and an ALiBi bias kept for the longest sequence seen (non-persistent buffers)."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, length: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads), persistent=False)
        self.build(length)

    def build(self, length: int) -> None:
        self.register_buffer("mask", torch.ones(length, length, dtype=torch.bool).tril(), persistent=False)
        distance = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        self.register_buffer("alibi", self.slopes[:, None, None] * distance.clamp(max=0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if n > self.mask.shape[0]:
            self.build(n)
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        bias = self.alibi[:, :n, :n].masked_fill(~self.mask[:n, :n], float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, d)


class SeqNet(nn.Module):
    """Token embedding, rotary table, causal attention with ALiBi, a BatchNorm over features, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.rot = Rotary()
        self.attn = CausalAttention()
        self.norm = nn.BatchNorm1d(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.rot(self.embed(tokens)))
        return self.head(self.norm(h.transpose(1, 2)).transpose(1, 2))


def tokens(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def qat_net() -> nn.Module:
    """A small network prepared for quantization-aware training with the default x86 configuration, in train mode.

    ``torch.ao.quantization`` warns that it is deprecated (in favour of torchao, not installed here) and that
    ``reduce_range`` will be; neither is about the code under test.
    """
    torch.manual_seed(0)
    net = nn.Sequential(tq.QuantStub(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), tq.DeQuantStub())
    net.qconfig = tq.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Please use quant_min and quant_max", UserWarning)
        return tq.prepare_qat(net.train())
