"""Inspection sets from natural textures that scikit-image ships (gravel, brick, grass), with synthetic
defects and their exact masks; deterministic by seed, MVTec-AD layout. One builder (`write_set`), two sets:

- `build_texture_set` (benchmarks/quality.py): each image a random crop of the texture (random flip and
  quarter turn) resized to `image_size`, so no two images are alike, as on a line. A defect is a
  Perlin-noise blob inside an ellipse where the surface is faintly altered: brightness shifted by 8-15%
  or the texture smoothed away.
- `build_synthetic` (tests, benchmarks/bench_speed.py): RGB crops, brightness-jittered, with a small
  black or white blob (an ellipse, a scratch line) pasted with a hard edge.

The mask is the altered region itself, so pixel metrics are exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from hiad_train.synthesis import perlin_noise

TEXTURES = ("gravel", "brick", "grass")
Sample = Callable[[np.random.Generator], np.ndarray]
Defect = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


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


def jittered_crop(source: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random (width, height) crop of a gray texture (enlarged first if smaller), brightness-jittered
    by up to 5%, as RGB uint8."""
    base = source
    w, h = size
    scale = max(w / base.shape[1], h / base.shape[0], 1.0)
    if scale > 1:
        base = cv2.resize(base, (int(np.ceil(base.shape[1] * scale)), int(np.ceil(base.shape[0] * scale))))
    y = int(rng.integers(0, base.shape[0] - h + 1))
    x = int(rng.integers(0, base.shape[1] - w + 1))
    crop = base[y : y + h, x : x + w].astype(np.float32) * float(rng.uniform(0.95, 1.05))
    return np.repeat(np.clip(crop, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


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


def painted_defect(image: np.ndarray, rng: np.random.Generator, max_size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Paint one small black or white defect (an ellipse or a scratch line); returns (image, exact bool mask)."""
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


def write_set(root: Path, n_train: int, n_test: int, seed: int, sample: Sample, defect: Defect) -> Path:
    """Write `root` (train/good, test/good, test/defect, ground_truth/defect) from one seeded generator:
    `sample` draws each image (gray, or RGB), `defect` alters every second test image."""
    rng = np.random.default_rng(seed)
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def write(path: Path, image: np.ndarray) -> None:
        cv2.imwrite(str(path), image[:, :, ::-1] if image.ndim == 3 else image)

    for i in range(n_train):
        write(root / f"train/good/{i:03d}.png", sample(rng))
    for i in range(n_test):
        image = sample(rng)
        if i % 2 == 0:
            write(root / f"test/good/{i:03d}.png", image)
            continue
        image, mask = defect(image, rng)
        write(root / f"test/defect/{i:03d}.png", image)
        cv2.imwrite(str(root / f"ground_truth/defect/{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root


def build_texture_set(
    out: str | Path, name: str, image_size: int = 512, n_train: int = 12, n_test: int = 24, seed: int = 0
) -> Path:
    """`out/<name>`: faint defects on flipped and turned gray crops; half the test set defective."""
    source = texture(name)
    sample = lambda rng: sample_surface(source, image_size, rng)  # noqa: E731
    return write_set(Path(out) / name, n_train, n_test, seed, sample, faint_defect)


def build_synthetic(
    out: str | Path,
    size: tuple[int, int] = (512, 512),
    n_train: int = 6,
    n_test: int = 6,
    texture_name: str = "brick",
    seed: int = 0,
) -> Path:
    """`out/synthetic_<texture>`: painted defects on jittered RGB crops; half the test set defective."""
    source = texture(texture_name)
    return write_set(
        Path(out) / f"synthetic_{texture_name}",
        n_train,
        n_test,
        seed,
        lambda rng: jittered_crop(source, size, rng),
        lambda image, rng: painted_defect(image, rng, max_size=max(8, min(size) // 12)),
    )
