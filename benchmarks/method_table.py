"""The HiAD method table on the ELPV demo: image AUROC / pixel AUROC / AUPRO for O2O, + thumbnail,
+ fusion [0, 1], SpatialClustering 4, Retrieve 4 — same seed, same data (data/elpv from `make demo`).

Run: .venv/bin/python benchmarks/method_table.py   (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import time
from pathlib import Path

from hiad_train.config import load_config
from hiad_train.data import read_mvtec
from hiad_train.trainer import HRTrainer

ROOT = Path(__file__).resolve().parents[1]
THUMB = {"thumbnail_size": 512, "target_embed_dimension": 128, "percentage": 0.1}
VARIANTS = {
    "O2O": {},
    "O2O + thumbnail 512": {"thumbnail": THUMB},
    "O2O + fusion [0,1] (0.5/0.5)": {"ds_factors": [0, 1], "fusion_weights": [0.5, 0.5]},
    "SpatialClustering 4": {"tasks": {"generator": "spatial_clustering", "cluster_number": 4}},
    "Retrieve 4": {"tasks": {"generator": "retrieve", "cluster_number": 4}},
}


def main() -> None:
    data = ROOT / "data" / "elpv"
    if not data.is_dir():
        raise SystemExit("run `make demo` first (it builds data/elpv)")
    train, test = read_mvtec(data, "train"), read_mvtec(data, "test")
    print("| variant | tasks | image AUROC | pixel AUROC | AUPRO | train s |")
    print("|---|---|---|---|---|---|")
    for name, overrides in VARIANTS.items():
        cfg = load_config(
            ROOT / "configs" / "demo.yaml", {**overrides, "evaluation": {"resize": 512, "overlays": False}}
        )
        trainer = HRTrainer(cfg, progress=False)
        t0 = time.perf_counter()
        model = trainer.fit(train)
        seconds = time.perf_counter() - t0
        m, _ = trainer.evaluate(model, test)
        print(
            f"| {name} | {len(model.tasks)} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['aupro']:.4f} | "
            f"{seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
