"""Per-position multivariate Gaussian statistics and the Mahalanobis distance (PaDiM's maths).

Training fits one Gaussian per feature-grid position from a few normal images; scoring is the
Mahalanobis distance of each position's feature to its own Gaussian. The distance is written with
two batched matmuls (positions as the batch axis) so that it exports to ONNX as plain MatMul nodes.
"""

from __future__ import annotations

import torch

# Added to every covariance before inversion (Defard et al. 2021, sec. 3.2): few training images
# give a rank-deficient covariance; the ridge keeps it invertible.
COVARIANCE_RIDGE = 0.01


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (P, C) and unbiased covariance (P, C, C) per position of features (N, C, P), N >= 2.

    Computed in float64 (the sums over N images lose precision in float32) and returned as float32.
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 training samples, got {n}")
    x = features.double().permute(2, 0, 1)  # (P, N, C)
    mean = x.mean(dim=1)
    centred = x - mean[:, None, :]
    covariance = centred.transpose(1, 2) @ centred / (n - 1)
    return mean.float(), covariance.float()


def regularized_inverse(covariance: torch.Tensor, ridge: float = COVARIANCE_RIDGE) -> torch.Tensor:
    """Inverse of covariance + ridge * I for a batch of covariances (P, C, C), in float64.

    The regularized matrix is symmetric positive definite, so it is inverted through its Cholesky
    factor (stabler and faster than a general LU inverse)."""
    eye = torch.eye(covariance.shape[-1], dtype=torch.float64, device=covariance.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(covariance.double() + ridge * eye)).float()


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, inverse_covariance: torch.Tensor) -> torch.Tensor:
    """Distance (P, B) of features (P, B, C) to per-position Gaussians: mean (P, C), inverse (P, C, C)."""
    diff = features - mean[:, None, :]
    squared = ((diff @ inverse_covariance) * diff).sum(dim=-1)
    return squared.clamp_min(0).sqrt()
