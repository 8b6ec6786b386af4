"""Inspection sets from natural textures that scikit-image ships (gravel, brick, grass), with faint
synthetic defects and their exact masks; deterministic by seed, MVTec-AD layout.

Each image is a random crop of the texture (random flip and quarter turn) resized to `image_size`,
so no two images are alike, as on a line. A defect is a Perlin-noise blob inside an ellipse where the
surface is faintly altered: brightness shifted by 8-15% or the texture smoothed away. The mask is
the altered region itself, so pixel metrics are exact.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from hiad_train.synthesis import perlin_noise

TEXTURES = ("gravel", "brick", "grass")


def texture(name: str) -> np.ndarray:
    """A scikit-image texture photograph as gray uint8 (shipped with the package, no download)."""
    import skimage.data

    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose one of {', '.join(TEXTURES)}")
    image = getattr(skimage.data, name)()
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def sample_surface(source: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop (7/8 of the side), flipped and turned at random, resized to size x size."""
    side = source.shape[0] * 7 // 8
    y, x = rng.integers(0, source.shape[0] - side + 1), rng.integers(0, source.shape[1] - side + 1)
    crop = np.rot90(source[y : y + side, x : x + side], int(rng.integers(4)))
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)


def faint_defect(surface: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(altered surface, bool mask): a blob of 2-6% of the side's square, faintly brighter, darker or smoothed."""
    h, w = surface.shape
    radius = rng.uniform(0.06, 0.14) * min(h, w)
    cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
    yy, xx = np.mgrid[:h, :w]
    ellipse = ((yy - cy) / radius) ** 2 + ((xx - cx) / (radius * rng.uniform(0.5, 1.5))) ** 2 <= 1
    mask = ellipse & (perlin_noise((h, w), (8, 8), rng) > -0.2)
    if mask.sum() < 0.25 * ellipse.sum():
        mask = ellipse
    out = surface.astype(np.float32)
    if rng.random() < 0.5:
        out[mask] *= 1 + rng.choice([-1, 1]) * rng.uniform(0.08, 0.15)
    else:
        out[mask] = cv2.GaussianBlur(out, (0, 0), sigmaX=3)[mask]
    return np.clip(out, 0, 255).astype(np.uint8), mask


def build_texture_set(out: str | Path, name: str, image_size: int = 512, n_train: int = 12, n_test: int = 24, seed: int = 0) -> Path:
    """Write `out/<name>` (train/good, test/good, test/defect, ground_truth/defect); half the test set defective."""
    rng = np.random.default_rng(seed)
    source = texture(name)
    root = Path(out) / name
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / f"train/good/{i:03d}.png"), sample_surface(source, image_size, rng))
    for i in range(n_test):
        surface = sample_surface(source, image_size, rng)
        if i % 2 == 0:
            cv2.imwrite(str(root / f"test/good/{i:03d}.png"), surface)
            continue
        surface, mask = faint_defect(surface, rng)
        cv2.imwrite(str(root / f"test/defect/{i:03d}.png"), surface)
        cv2.imwrite(str(root / f"ground_truth/defect/{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root
