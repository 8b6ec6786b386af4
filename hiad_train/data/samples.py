"""High-resolution samples: an image file, an optional ground-truth mask, a label and a class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hiad_runtime.geometry import Size
from hiad_runtime.image import load_image, load_mask, resize_image, resize_mask, source_max_pixels


@dataclass(frozen=True)
class HRSample:
    image_path: Path
    label: int = 0  # 0 good, 1 anomalous
    mask_path: Path | None = None
    class_name: str = ""
    label_name: str = "good"

    def image(self, size: Size) -> np.ndarray:
        """RGB uint8 at `size` (width, height); a file declaring more than `source_max_pixels(size)`
        pixels, or cut short, is refused by name (`ImageError`) before it is decoded."""
        return resize_image(load_image(self.image_path, source_max_pixels(size)), size)

    def mask(self, size: Size) -> np.ndarray:
        """Bool mask at `size`; all False for good samples or samples without a mask file."""
        if self.mask_path is None:
            return np.zeros((size[1], size[0]), bool)
        return resize_mask(load_mask(self.mask_path, source_max_pixels(size)), size)
