"""PatchCore's locally aware patch embedding, as one exportable module: uint8 tile -> (B, D, h, w).

PatchCore embeds each feature position by (1) taking its merge_size x merge_size neighbourhood in
every chosen layer, (2) bilinearly resizing later layers to the first layer's grid, (3) adaptive
average pooling each layer's flattened neighbourhood to `pretrain_embed_dimension`, then (4) pooling
the concatenation of layers to `target_embed_dimension`. Steps (1), (3) and (4) are fixed linear maps
and (2) is linear per channel, so the whole chain equals one convolution per layer followed by the
resize and a sum. That folded form is what we run and export: same numbers, a fraction of the work.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hiad_train.embedders import BackboneFeatures


def adaptive_pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The (n_in, n_out) matrix of F.adaptive_avg_pool1d from length n_in to n_out."""
    return F.adaptive_avg_pool1d(torch.eye(n_in, dtype=torch.float64)[:, None, :], n_out)[:, 0, :]


def folded_projections(
    channels: Sequence[int], merge_size: int, pretrain_dim: int, target_dim: int
) -> list[torch.Tensor]:
    """Per layer, the conv weight (target_dim, C, k, k) equal to unfold -> pool -> concat -> pool."""
    k = merge_size
    final = adaptive_pool_matrix(len(channels) * pretrain_dim, target_dim)
    weights = []
    for i, c in enumerate(channels):
        per_layer = adaptive_pool_matrix(c * k * k, pretrain_dim) @ final[i * pretrain_dim : (i + 1) * pretrain_dim]
        weights.append(per_layer.T.reshape(target_dim, c, k, k).float().contiguous())
    return weights


class PatchEmbedder(nn.Module):
    """RGB uint8 NHWC tiles -> (PatchCore embeddings (B, D, h, w),); normalization is inside the graph."""

    def __init__(
        self, features: BackboneFeatures, merge_size: int, pretrain_embed_dimension: int, target_embed_dimension: int
    ):
        super().__init__()
        self.features = features
        self.merge_size = merge_size
        self.projections = nn.ParameterList(
            nn.Parameter(w, requires_grad=False)
            for w in folded_projections(features.channels, merge_size, pretrain_embed_dimension, target_embed_dimension)
        )
        self.dim = target_embed_dimension

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.aggregate(self.features(image)),)

    def aggregate(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The backbone stages (B, C_s, h_s, w_s) -> locally aware embeddings (B, D, h, w)."""
        pad = self.merge_size // 2
        grid = features[0].shape[-2:]
        out = None
        for f, w in zip(features, self.projections):
            e = F.conv2d(f, w, padding=pad)
            if e.shape[-2:] != grid:
                e = F.interpolate(e, size=grid, mode="bilinear", align_corners=False)
            out = e if out is None else out + e
        return out


def reference_embedding(features: Sequence[torch.Tensor], merge_size: int, pretrain_dim: int, target_dim: int):
    """PatchCore's literal unfold/resize/pool chain (for tests of the folded form): (B, D, h, w)."""
    k = merge_size
    grid = features[0].shape[-2:]
    per_layer = []
    for f in features:
        b, c = f.shape[:2]
        u = F.unfold(f, kernel_size=k, padding=k // 2).reshape(b, c * k * k, *f.shape[-2:])
        if u.shape[-2:] != grid:
            u = F.interpolate(u, size=grid, mode="bilinear", align_corners=False)
        flat = u.permute(0, 2, 3, 1).reshape(-1, 1, c * k * k)
        per_layer.append(F.adaptive_avg_pool1d(flat, pretrain_dim)[:, 0])
    stacked = torch.stack(per_layer, 1).reshape(-1, 1, len(features) * pretrain_dim)
    out = F.adaptive_avg_pool1d(stacked, target_dim)[:, 0]
    return out.reshape(features[0].shape[0], *grid, target_dim).permute(0, 3, 1, 2)
