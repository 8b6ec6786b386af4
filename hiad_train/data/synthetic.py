"""Synthetic defects on real textures, with exact pixel masks, for tests that need pixel truth.

Textures come from scikit-image's bundled photographs (no download). A defect is a small dark or
bright blob (an ellipse, a scratch line) pasted with a hard edge, so the mask is exact.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

TEXTURES = ("brick", "gravel", "grass", "rough_wall")


def texture(name: str = "brick") -> np.ndarray:
    """A real grayscale texture from scikit-image, as RGB uint8."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


def textured_image(size: tuple[int, int], rng: np.random.Generator, name: str = "brick") -> np.ndarray:
    """A random crop (resized if needed) of a texture, slightly jittered in brightness."""
    base = texture(name)
    w, h = size
    scale = max(w / base.shape[1], h / base.shape[0], 1.0)
    if scale > 1:
        base = cv2.resize(base, (int(np.ceil(base.shape[1] * scale)), int(np.ceil(base.shape[0] * scale))))
    y = int(rng.integers(0, base.shape[0] - h + 1))
    x = int(rng.integers(0, base.shape[1] - w + 1))
    crop = base[y : y + h, x : x + w].astype(np.float32) * float(rng.uniform(0.95, 1.05))
    return np.clip(crop, 0, 255).astype(np.uint8)


def add_defect(image: np.ndarray, rng: np.random.Generator, max_size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Paint one small defect; returns (image, exact bool mask)."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    cx, cy = int(rng.integers(max_size, w - max_size)), int(rng.integers(max_size, h - max_size))
    if rng.random() < 0.5:
        axes = (int(rng.integers(max_size // 4, max_size)), int(rng.integers(max_size // 4, max_size)))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    else:
        angle = rng.uniform(0, np.pi)
        dx, dy = int(np.cos(angle) * max_size * 1.5), int(np.sin(angle) * max_size * 1.5)
        cv2.line(mask, (cx - dx, cy - dy), (cx + dx, cy + dy), 255, int(rng.integers(3, 8)))
    out = image.copy()
    colour = np.array([0, 0, 0] if rng.random() < 0.5 else [255, 255, 255], np.uint8)
    out[mask > 0] = colour
    return out, mask > 0


def build_synthetic(
    out: str | Path, size: tuple[int, int] = (512, 512), n_train: int = 6, n_test: int = 6, texture_name: str = "brick", seed: int = 0
) -> Path:
    """A small MVTec-layout dataset of one texture with exact-mask defects in half the test images."""
    rng = np.random.default_rng(seed)
    root = Path(out) / f"synthetic_{texture_name}"
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / f"train/good/{i:03d}.png"), textured_image(size, rng, texture_name)[:, :, ::-1])
    for i in range(n_test):
        img = textured_image(size, rng, texture_name)
        if i % 2 == 0:
            cv2.imwrite(str(root / f"test/good/{i:03d}.png"), img[:, :, ::-1])
        else:
            img, mask = add_defect(img, rng, max_size=max(8, min(size) // 12))
            cv2.imwrite(str(root / f"test/defect/{i:03d}.png"), img[:, :, ::-1])
            cv2.imwrite(str(root / f"ground_truth/defect/{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root
