"""k-nearest-neighbour scoring against a memory bank, in a form that exports to ONNX.

Search uses the expanded form |q|^2 - 2 q.b + |b|^2 over bank chunks (a running top-k merge), so no
tensor ever holds queries x bank x dims; the chosen neighbours' distances are then recomputed exactly
as |q - b| (the expanded form loses precision for near neighbours). The runtime's faiss path does the
same refinement, which is what makes the two agree to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn


def knn_search(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Indices (M, k) of the k nearest bank rows for each query (M, D)."""
    q_sq = (queries * queries).sum(1, keepdim=True)
    best_d = best_i = None
    for start in range(0, bank.shape[0], chunk):
        part = bank[start : start + chunk]
        d2 = q_sq - 2 * queries @ part.T + bank_sq[start : start + chunk][None]
        kk = min(k, part.shape[0])
        d, i = torch.topk(d2, kk, dim=1, largest=False)
        i = i + start
        if best_d is not None:
            d, sel = torch.topk(torch.cat([best_d, d], 1), min(k, best_d.shape[1] + kk), dim=1, largest=False)
            i = torch.gather(torch.cat([best_i, i], 1), 1, sel)
        best_d, best_i = d, i
    return best_i


def exact_distances(queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """|q - b| for each query and each of its neighbours (M, k)."""
    diff = queries[:, None, :] - bank[indices]
    return (diff * diff).sum(-1).sqrt()


class KnnHead(nn.Module):
    """Embedding (B, D, h, w) -> mean distance to the k nearest bank entries (B, h, w)."""

    def __init__(self, bank: torch.Tensor, k: int, chunk: int = 2048):
        super().__init__()
        self.register_buffer("bank", bank.float().contiguous())
        self.register_buffer("bank_sq", (self.bank * self.bank).sum(1))
        self.k = min(k, bank.shape[0])
        self.chunk = chunk

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        b, d, h, w = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, d)
        idx = knn_search(queries, self.bank, self.bank_sq, self.k, self.chunk)
        return exact_distances(queries, self.bank, idx).mean(1).reshape(b, h, w)
