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


def merged_statistics(
    count: int, mean: torch.Tensor, covariance: torch.Tensor, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (P, C) and unbiased covariance (P, C, C) of `count` earlier samples (their `mean`, `covariance`)
    and new `features` (M, C, P) together, as `gaussian_statistics` gives on all count + M at once.

    The running sums are the count, the mean and the sum of squared deviations ((count - 1) * covariance);
    the new samples' own sums are merged in by the pairwise update (Chan, Golub and LeVeque 1979), in
    float64, returned as float32."""
    m = features.shape[0]
    if m == 0:
        return mean, covariance
    x = features.double().permute(2, 0, 1)  # (P, M, C)
    new_mean = x.mean(dim=1)
    centred = x - new_mean[:, None, :]
    n = count + m
    delta = new_mean - mean.double()
    squares = (
        covariance.double() * (count - 1)
        + centred.transpose(1, 2) @ centred
        + delta[:, :, None] * delta[:, None, :] * (count * m / n)
    )
    return (mean.double() + delta * (m / n)).float(), (squares / (n - 1)).float()


def covariance_from_inverse(inverse_covariance: torch.Tensor, ridge: float = COVARIANCE_RIDGE) -> torch.Tensor:
    """The covariance a `regularized_inverse` was computed from (float64 inversion; float32 in, float32 out)."""
    eye = torch.eye(inverse_covariance.shape[-1], dtype=torch.float64)
    return (torch.linalg.inv(inverse_covariance.double()) - ridge * eye).float()


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
