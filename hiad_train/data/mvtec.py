"""The MVTec-AD folder layout: train/good, test/<type>, ground_truth/<type>/<stem>_mask.png."""

from __future__ import annotations

from pathlib import Path

from hiad_runtime.results import find_inputs
from hiad_train.data.samples import HRSample


def read_mvtec(root: str | Path, split: str) -> list[HRSample]:
    """Samples of one class folder (`root` holds train/ and test/) for split 'train' or 'test'."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected the MVTec-AD layout: {split}/<type>/*.png)")
    samples = []
    for kind in sorted(p for p in folder.iterdir() if p.is_dir()):
        for image in find_inputs([kind]):
            if kind.name == "good":
                samples.append(HRSample(image, 0, None, root.name, "good"))
                continue
            mask = root / "ground_truth" / kind.name / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise FileNotFoundError(f"{image}: anomalous test image without its mask {mask}")
            samples.append(HRSample(image, 1, mask, root.name, kind.name))
    if not samples:
        raise FileNotFoundError(f"{folder}: no images found")
    return samples
