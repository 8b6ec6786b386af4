"""The quality suite: inspection sets x configurations -> image AUROC, pixel AUROC, pixel AP, AUPRO,
false-alarm and miss rates at the model's thresholds (the false-alarm-rate rule, and HiAD's F1 rule
for comparison), k-NN bank size, training time and latency. Figures go to docs/quality.md.

Sets are built here, with fixed seeds, from what the package registries ship: real ELPV
electroluminescence cells (mono and poly, 2x2 and 4x4 cells per module, whole-cell defect masks)
and scikit-image textures with faint synthetic defects (exact masks); `demo` is `make demo`'s set
(2048 px, slow), `gravel-2048` gravel at 2048 px in 16 tiles of 512 (slow). Each set: 12 training images
(3 held out for validation), 24 test (half defective).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py [--sets a,b] [--configs a,b] [--out data/quality]
Each finished row is appended to OUT/results.jsonl at once, so an interrupted run keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hiad_runtime.postprocess import PostprocessSpec, image_score
from hiad_train.config import ThresholdConfig, load_config
from hiad_train.data import read_mvtec
from hiad_train.data.elpv import build_elpv_demo
from hiad_train.data.textures import build_texture_set
from hiad_train.evaluation import default_evaluators, evaluate, image_auroc
from hiad_train.trainer import HRTrainer
from hiad_train.validation import split_validation, validate

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 12, 24


def _elpv(rows: int, cell: int, kind: str, seed: int):
    return lambda out: build_elpv_demo(out, rows, rows, cell, N_TRAIN, N_TEST, kind, seed)


# name -> (builder(parent folder) -> dataset root, image_size, patch_size)
SETS = {
    "elpv-mono-2x2": (_elpv(2, 256, "mono", 1), 512, 256),
    "elpv-poly-2x2": (_elpv(2, 256, "poly", 2), 512, 256),
    "elpv-mono-4x4": (_elpv(4, 256, "mono", 3), 1024, 256),
    "elpv-poly-4x4": (_elpv(4, 256, "poly", 4), 1024, 256),
    "gravel": (lambda out: build_texture_set(out, "gravel", 512, N_TRAIN, N_TEST, 5), 512, 128),
    "brick": (lambda out: build_texture_set(out, "brick", 512, N_TRAIN, N_TEST, 6), 512, 128),
    "grass": (lambda out: build_texture_set(out, "grass", 512, N_TRAIN, N_TEST, 7), 512, 128),
    "demo": (lambda out: build_elpv_demo(out), 2048, 512),
    "gravel-2048": (lambda out: build_texture_set(out, "gravel", 2048, N_TRAIN, N_TEST, 5), 2048, 512),
    "elpv-poly-2048": (_elpv(4, 512, "poly", 8), 2048, 512),
}
VAL = {
    "anomaly_syn_fn": {"name": "image_blending", "p": 0.5},
    "val_sample_ratio": 0.25,
    "max_patch_number": 200,
    "evaluators": ["image_auroc", "pixel_metrics"],
}
# name -> (config file, overrides); every one validates, so every one has thresholds
CONFIGS = {
    "default-128d": ("demo.yaml", {"val_config": VAL}),
    "per-task": ("demo.yaml", {"val_config": {**VAL, "normalization": "per_task"}}),  # HiAD's normalization
    "1024d": ("demo.yaml", {"val_config": VAL, "patch": {"target_embed_dimension": 1024}}),
    "hiad_full": ("hiad_full.yaml", {}),
    # one PatchCore setting changed at a time (the defaults' sweep)
    "coreset-0.25": ("demo.yaml", {"val_config": VAL, "patch": {"percentage": 0.25}}),
    "nn-3": ("demo.yaml", {"val_config": VAL, "patch": {"anomaly_scorer_num_nn": 3}}),
    "layers-1-2-3": ("demo.yaml", {"val_config": VAL, "patch": {"layers_to_extract_from": [1, 2, 3]}}),
    # the backbones with packaged ImageNet weights (default-128d is tf_efficientnet_lite0)
    "lite1": ("demo.yaml", {"val_config": VAL, "patch": {"backbone_name": "tf_efficientnet_lite1"}}),
    "lite2": ("demo.yaml", {"val_config": VAL, "patch": {"backbone_name": "tf_efficientnet_lite2"}}),
    # hiad_full's branches one at a time on the default
    "+clustering": (
        "demo.yaml",
        {"val_config": VAL, "tasks": {"generator": "spatial_clustering", "cluster_number": 4, "feature_resolution": 1}},
    ),
    "+fusion": ("demo.yaml", {"val_config": VAL, "ds_factors": [0, 1], "fusion_weights": [0.5, 0.5]}),
    "+thumbnail": (
        "demo.yaml",
        {
            "val_config": VAL,
            "thumbnail": {
                "backbone_name": "tf_efficientnet_lite0",
                "layers_to_extract_from": [2, 3],
                "percentage": 0.1,
                "target_embed_dimension": 128,
                "thumbnail_size": 512,
            },
        },
    ),
    # the other detectors' CPU settings (FastFlow: one flow for all tiles, all-to-one; RealNet: one task)
    "fastflow": ("fastflow_cpu.yaml", {"val_config": VAL}),
    # FastFlow's CPU setting before issue #20: one task (one flow) per tile position
    "fastflow-o2o": ("fastflow_cpu.yaml", {"val_config": VAL, "tasks": {"generator": "o2o"}}),
    "realnet": ("realnet_cpu.yaml", {"val_config": VAL}),
}
# image-score rules compared on the same maps (no retraining): the image AUROC each would give
SCORE_RULES = {
    "pool16": PostprocessSpec(),
    "pool8": PostprocessSpec(score_pool=8),
    "pool32": PostprocessSpec(score_pool=32),
    "max": PostprocessSpec(score_pool=1),
    "top100": PostprocessSpec(score_rule="top_k_mean", score_top_k=100),
}


def _rates(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """(false-alarm rate on good images, miss rate on defective ones) at `threshold`."""
    if threshold is None:
        return float("nan"), float("nan")
    flagged = scores >= threshold
    return float(flagged[labels == 0].mean()), float((~flagged[labels == 1]).mean())


def run(set_name: str, config_name: str, data: Path) -> dict:
    root, image_size, patch_size = data, *SETS[set_name][1:]
    file, overrides = CONFIGS[config_name]
    overrides = {
        **overrides,
        "image_size": image_size,
        "patch_size": patch_size,
        "evaluation": {"resize": 512, "overlays": False},
    }
    cfg = load_config(ROOT / "configs" / file, overrides)
    if cfg.thumbnail is not None:
        cfg = cfg.model_copy(update={"thumbnail": cfg.thumbnail.model_copy(update={"thumbnail_size": image_size // 4})})
    train, test = read_mvtec(root, "train"), read_mvtec(root, "test")
    trainer = HRTrainer(cfg, progress=False)
    t0 = time.perf_counter()
    model = trainer.fit(train)
    train_s = time.perf_counter() - t0
    by_rate = model.thresholds
    _, val_samples = split_validation(list(train), cfg.val_config.val_sample_ratio, cfg.seed)  # the trainer's split
    validate(model, val_samples, cfg.val_config.model_copy(update={"threshold": ThresholdConfig(mode="f1")}), cfg.seed)
    by_f1, model.thresholds = model.thresholds, by_rate
    t0 = time.perf_counter()
    preds = trainer.predict(model, test)
    latency = (time.perf_counter() - t0) / len(test)
    metrics = evaluate(preds.scores, preds.labels, preds.maps, preds.masks, default_evaluators(512))
    far, miss = _rates(preds.scores, preds.labels, by_rate["image"])
    far_f1, miss_f1 = _rates(preds.scores, preds.labels, by_f1["image"])
    bank = sum(v.numel() * v.element_size() for d in model.detectors.values() for v in d.state().values())
    rule = by_rate["rules"]["image"]
    by_score_rule = {
        name: image_auroc(np.array([image_score(m, spec) for m in preds.maps]), preds.labels, None, None)["image_auroc"]
        for name, spec in SCORE_RULES.items()
    }
    return {
        "set": set_name,
        "config": config_name,
        "tasks": len(model.tasks),
        **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")},
        "threshold": by_rate["image"],
        "rate_interval_90": rule["rate_interval_90"],
        "val_images": rule["images"],
        "false_alarm": far,
        "miss": miss,
        "threshold_f1": by_f1["image"],
        "false_alarm_f1": far_f1,
        "miss_f1": miss_f1,
        "bank_mb": bank / 1e6,
        "train_s": train_s,
        "s_per_image": latency,
        "good": int((preds.labels == 0).sum()),
        "defective": int((preds.labels == 1).sum()),
        "image_auroc_by_score_rule": by_score_rule,
    }


HEADER = (
    "| set | config | image AUROC | pixel AUROC | pixel AP | AUPRO | false alarms (target 1%) | misses "
    "| false alarms, F1 rule | misses, F1 rule | bank MB | train s | s/image |\n" + "|---" * 13 + "|"
)


def row(r: dict) -> str:
    f = lambda x: f"{x:.3f}"  # noqa: E731
    pct = lambda x: "n/a" if np.isnan(x) else f"{x:.0%}"  # noqa: E731
    return (
        f"| {r['set']} | {r['config']} | {f(r['image_auroc'])} | {f(r['pixel_auroc'])} | {f(r['pixel_ap'])} | "
        f"{f(r['aupro'])} "
        f"| {pct(r['false_alarm'])} of {r['good']} | {pct(r['miss'])} of {r['defective']} | {pct(r['false_alarm_f1'])} "
        f"| {pct(r['miss_f1'])} | {r['bank_mb']:.1f} | {r['train_s']:.0f} | {r['s_per_image']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    slow = ("demo", "elpv-poly-2048", "gravel-2048")
    parser.add_argument("--sets", default=",".join(s for s in SETS if s not in slow))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "quality")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    print(HEADER, flush=True)
    rows = []
    for set_name in args.sets.split(","):
        folder = args.out / set_name
        data = next((p.parent for p in folder.glob("*/train")), None) or SETS[set_name][0](folder)
        for config_name in args.configs.split(","):
            r = run(set_name, config_name, data)
            with results.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(row(r), flush=True)
            rows.append(r)
    print(
        "\nImage AUROC by image-score rule, on the same maps:\n\n| set | config | "
        + " | ".join(SCORE_RULES)
        + " |\n"
        + "|---" * (2 + len(SCORE_RULES))
        + "|"
    )
    for r in rows:
        print(
            f"| {r['set']} | {r['config']} | "
            + " | ".join(f"{v:.3f}" for v in r["image_auroc_by_score_rule"].values())
            + " |"
        )


if __name__ == "__main__":
    main()
