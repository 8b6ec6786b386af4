"""Transformer pieces of the ViT detectors' decoders: softmax and linear attention, the MLP, and a
pre-norm block. Attention is written with two-input matrix products only (no fused kernel, no
three-input einsum), so the exported graphs are MatMul/Softmax/elementwise ops that ONNX Runtime and
TensorRT both take. Queries come from one token set and keys/values from another (the same one for
self-attention; INP-Former's prototypes for its cross-attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Projections(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, query: torch.Tensor, context: torch.Tensor):
        """(B, N, C), (B, M, C) -> q (B, h, N, d), k and v (B, h, M, d)."""
        b = query.shape[0]  # reshape, not unflatten: unflatten exports a Mod that TensorRT rejects
        q = self.q(query).reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(1, 2).flatten(2))


class SoftmaxAttention(_Projections):
    """Multi-head scaled dot-product attention: softmax(q k^T / sqrt(d)) v."""

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(query, context)
        weights = torch.softmax((q * self.head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
        return self.merge(weights @ v)


class LinearAttention(_Projections):
    """Dinomaly's linear attention: kernel phi(x) = elu(x) + 1; out = phi(q) (phi(k)^T v) / (phi(q) sum phi(k)).
    Cost is linear in tokens, and it cannot focus on one token, so the decoder cannot copy its input."""

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(query, context)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = k.transpose(-2, -1) @ v  # (B, h, d, d)
        norm = q @ k.sum(-2, keepdim=True).transpose(-2, -1)  # (B, h, N, 1)
        return self.merge((q @ kv) / norm)


class Mlp(nn.Sequential):
    """Linear -> GELU -> dropout -> Linear -> dropout (dropout makes Dinomaly's noisy bottleneck)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x), context), then x + mlp(norm(x)).
    `context` defaults to the normalized tokens themselves (self-attention)."""

    def __init__(self, dim: int, attention: nn.Module, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attention = attention
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h if context is None else context)
        return x + self.mlp(self.norm2(x))


def to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    return grid.flatten(2).transpose(1, 2)


def to_grid(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *size)
