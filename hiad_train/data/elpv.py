"""The default demo: real electroluminescence (EL) images of PV modules composed from ELPV cells.

The `elpv-dataset` package ships 2,624 real 300x300 EL images of solar cells, each with a defect
probability (0, 1/3, 2/3, 1) and the module type (mono, poly). A module image is a rows x cols grid of
cells, as a real EL image of a module is. Training modules use only cells with probability 0; test
modules are half good (cells from a pool disjoint from training) and half with 1-3 defective cells
(probability > 0.5), whose whole cell area is the ground-truth mask. Written in the MVTec-AD layout,
plus HiAD jsonl meta files. Data licence: CC BY-NC-SA 4.0 (Deitsch et al., ELPV dataset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

CLASS_NAME = "elpv"


class ModuleType(StrEnum):
    """The ELPV cell type (monocrystalline, polycrystalline) a demo module is made of."""

    MONO = "mono"
    POLY = "poly"


@dataclass(frozen=True)
class ElpvCell:
    path: Path
    probability: float
    module_type: ModuleType


def elpv_cells() -> list[ElpvCell]:
    """All cells of the installed `elpv-dataset` package (labels.csv stores 2/3 as 0.6667)."""
    try:
        import elpv_dataset
    except ImportError as e:
        raise RuntimeError("the demo needs the `elpv-dataset` package: pip install elpv-dataset") from e
    data = Path(elpv_dataset.__file__).parent / "data"
    cells = []
    for line in (data / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            cells.append(ElpvCell(data / parts[0], float(parts[1]), ModuleType(parts[2])))
    return cells


def _cell(path: Path, size: int) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise RuntimeError(f"{path}: unreadable ELPV cell")
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if size < img.shape[0] else cv2.INTER_LINEAR)


def compose_module(cells: list[Path], rows: int, cols: int, cell_size: int) -> np.ndarray:
    """A grayscale module image: cells laid out row by row."""
    grid = [np.hstack([_cell(cells[r * cols + c], cell_size) for c in range(cols)]) for r in range(rows)]
    return np.vstack(grid)


def build_elpv_demo(
    out: str | Path,
    rows: int = 4,
    cols: int = 4,
    cell_size: int = 512,
    n_train: int = 10,
    n_test: int = 10,
    module_type: ModuleType = ModuleType.MONO,
    seed: int = 0,
) -> Path:
    """Write the demo dataset under `out/elpv` (deterministic by seed) and return that folder."""
    rng = np.random.default_rng(seed)
    cells = [c for c in elpv_cells() if c.module_type == module_type]
    good = [c.path for c in cells if c.probability == 0]
    defective = [c.path for c in cells if c.probability > 0.5]
    rng.shuffle(good)
    rng.shuffle(defective)
    per_module = rows * cols
    n_test_good = n_test - n_test // 2
    need_train = n_train * per_module
    if need_train + per_module > len(good):
        raise ValueError(f"{n_train} training modules of {per_module} cells need more than {len(good)} good cells")
    train_pool, test_pool = good[:need_train], good[need_train:]

    root = Path(out) / CLASS_NAME
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    meta = {"train": [], "test": []}

    def take(pool: list[Path], k: int) -> list[Path]:
        return [pool[i] for i in rng.choice(len(pool), size=k, replace=len(pool) < k)]

    for i in tqdm(range(n_train), desc="demo train modules", leave=False):
        name = f"train/good/module_{i:03d}.png"
        cv2.imwrite(
            str(root / name), compose_module(train_pool[i * per_module : (i + 1) * per_module], rows, cols, cell_size)
        )
        meta["train"].append(
            {"filename": f"{CLASS_NAME}/{name}", "clsname": CLASS_NAME, "label": 0, "label_name": "good"}
        )
    for i in tqdm(range(n_test), desc="demo test modules", leave=False):
        chosen = take(test_pool, per_module)
        if i < n_test_good:
            name = f"test/good/module_{i:03d}.png"
            cv2.imwrite(str(root / name), compose_module(chosen, rows, cols, cell_size))
            meta["test"].append(
                {"filename": f"{CLASS_NAME}/{name}", "clsname": CLASS_NAME, "label": 0, "label_name": "good"}
            )
            continue
        slots = rng.choice(per_module, size=int(rng.integers(1, 4)), replace=False)
        mask = np.zeros((rows * cell_size, cols * cell_size), np.uint8)
        for slot, cell in zip(slots, take(defective, len(slots))):
            chosen[slot] = cell
            r, c = divmod(int(slot), cols)
            mask[r * cell_size : (r + 1) * cell_size, c * cell_size : (c + 1) * cell_size] = 255
        name = f"test/defect/module_{i:03d}.png"
        mask_name = f"ground_truth/defect/module_{i:03d}_mask.png"
        cv2.imwrite(str(root / name), compose_module(chosen, rows, cols, cell_size))
        cv2.imwrite(str(root / mask_name), mask)
        meta["test"].append(
            {
                "filename": f"{CLASS_NAME}/{name}",
                "mask": f"{CLASS_NAME}/{mask_name}",
                "clsname": CLASS_NAME,
                "label": 1,
                "label_name": "defect",
            }
        )
    for split, records in meta.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root
