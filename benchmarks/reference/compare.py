"""Our detectors next to HiAD 0.2.1's own, on the quality suite's sets: one table of configuration x set
x {ours, HiAD}: image AUROC, pixel AUROC, pixel AP, AUPRO, training seconds, seconds per image.

Both sides train on the same images with the same backbone, layers, tiling (O2O tasks) and detector
settings, without a validation set (HiAD's run scripts train without one); HiAD runs in its own venv
(benchmarks/reference/setup.sh) through hiad_side.py. Both sides' maps are scored here by our
evaluators (hiad_train/evaluation.py) at 512 px, against the same masks. Not part of `make test`.

Run (project venv; OMP_NUM_THREADS=1 so both sides use one thread):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference/compare.py --sets elpv-poly-2048 --configs patchcore
Rows are appended to OUT/results.jsonl as they finish (default OUT: data/reference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import SETS  # noqa: E402

from hiad_train.config import TrainConfig, load_config  # noqa: E402
from hiad_train.data import read_mvtec  # noqa: E402
from hiad_train.data.samples import HRSample  # noqa: E402
from hiad_train.evaluation import default_evaluators, evaluate  # noqa: E402
from hiad_train.trainer import HRTrainer  # noqa: E402

EVAL_SIZE = 512
HERE = Path(__file__).resolve().parent
VENV = Path(os.environ.get("HIAD_REF_VENV", HERE / ".venv"))


def hiad_layers(backbone: str, layers: list) -> list[str]:
    """Our timm `out_indices` as the module names HiAD hooks (the same stage outputs)."""
    import timm

    info = timm.create_model(backbone, features_only=True, out_indices=layers, pretrained=False).feature_info
    return [d["module"] for d in info.get_dicts()]


def patchcore_config(patch) -> dict:
    """HiAD's HRPatchCore keys for our PatchCore config (faiss on CPU, one thread)."""
    return {
        "backbone_name": patch.backbone_name,
        "layers_to_extract_from": hiad_layers(patch.backbone_name, patch.layers_to_extract_from),
        "merge_size": patch.merge_size,
        "percentage": patch.percentage,
        "pretrain_embed_dimension": patch.pretrain_embed_dimension,
        "target_embed_dimension": patch.target_embed_dimension,
        "anomaly_scorer_num_nn": patch.anomaly_scorer_num_nn,
        "faiss_on_gpu": False,
        "faiss_num_workers": 1,
    }


def padim_config(patch) -> dict:
    """HiAD's HRPaDiM keys for our PaDiM config."""
    return {
        "backbone_name": patch.backbone_name,
        "embed_dimension": patch.embed_dimension,
        "layers_to_extract_from": hiad_layers(patch.backbone_name, patch.layers_to_extract_from),
    }


# HiAD's config from ours, per detector. HiAD's FastFlow, RD++, DeSTSeg and RealNet cannot run here
# (benchmarks/reference/README.md says why).
HIAD_CONFIG = {"patchcore": patchcore_config, "padim": padim_config}
# compared configuration -> (detector, our config file, overrides)
CONFIGS = {
    "patchcore": ("patchcore", "demo.yaml", {}),
    "patchcore-1024d": ("patchcore", "demo.yaml", {"patch": {"target_embed_dimension": 1024}}),
    # ours with the backbone's own pixel statistics (tf_efficientnet_lite0: 0.5/0.5) instead of HiAD's ImageNet ones
    "patchcore-backbone-norm": ("patchcore", "demo.yaml", {"patch": {"input_normalization": "backbone"}}),
    "padim": ("padim", "padim_cpu.yaml", {}),
    "padim-imagenet": ("padim", "padim_cpu.yaml", {"patch": {"input_normalization": "imagenet"}}),
}


def our_config(name: str, image_size: int, patch_size: int, seed: int = 0) -> TrainConfig:
    """The compared configuration `name` at a set's sizes and seed, one thread for the feature pass."""
    _, file, overrides = CONFIGS[name]
    base = {
        "seed": seed,
        "image_size": image_size,
        "patch_size": patch_size,
        "evaluation": {"resize": EVAL_SIZE, "overlays": False},
        "distributed": {"features": {"num_cpus": 1}},
    }
    return load_config(ROOT / "configs" / file, {**base, **overrides})


def record(s: HRSample) -> dict:
    return {
        "image": str(s.image_path),
        "mask": str(s.mask_path) if s.mask_path else None,
        "label": int(s.label),
        "label_name": s.label_name,
        "clsname": s.class_name,
    }


def scored(scores, maps, test: list[HRSample], image_size: int) -> dict:
    masks = [s.mask((image_size, image_size)) for s in test]
    labels = np.array([s.label for s in test])
    metrics = evaluate(np.asarray(scores), labels, list(maps), masks, default_evaluators(EVAL_SIZE))
    return {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")}


def run_ours(cfg: TrainConfig, train, test) -> dict:
    trainer = HRTrainer(cfg, progress=False)
    t0 = time.perf_counter()
    model = trainer.fit(train)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = trainer.predict(model, test)
    per_image = (time.perf_counter() - t0) / len(test)
    maps = [cv2.resize(m, (EVAL_SIZE, EVAL_SIZE), interpolation=cv2.INTER_LINEAR) for m in preds.maps]
    return {**scored(preds.scores, maps, test, cfg.image_size), "train_s": train_s, "s_per_image": per_image}


def hiad_job(cfg: TrainConfig, train, test) -> dict:
    """What hiad_side.py runs: the same samples, sizes, seed and batch, HiAD's detector config."""
    return {
        "detector": cfg.detector,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "eval_size": EVAL_SIZE,
        "config": HIAD_CONFIG[cfg.detector](cfg.patch),
        "train": [record(s) for s in train],
        "test": [record(s) for s in test],
    }


def run_hiad(name: str, cfg: TrainConfig, train, test, work: Path) -> dict:
    job_path, out = work / f"{name}_seed{cfg.seed}.json", work / f"{name}_seed{cfg.seed}.npz"
    job = hiad_job(cfg, train, test)
    job_path.write_text(json.dumps(job, indent=1))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    python = VENV / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python}: no reference venv; create it with benchmarks/reference/setup.sh")
    with open(work / f"{name}_seed{cfg.seed}.log", "w") as log:
        subprocess.run(
            [str(python), str(HERE / "hiad_side.py"), str(job_path), str(out)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    r = np.load(out)
    return {
        **scored(r["scores"], r["maps"], test, cfg.image_size),
        "train_s": float(r["train_s"]),
        "s_per_image": float(r["s_per_image"]),
    }


HEADER = (
    "| configuration | set | side | image AUROC | pixel AUROC | pixel AP | AUPRO | train s | s/image |\n"
    + "|---" * 9
    + "|"
)


def row(r: dict) -> str:
    return (
        f"| {r['config']} | {r['set']} | {r['side']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
        f"{r['pixel_ap']:.3f} | {r['aupro']:.3f} | {r['train_s']:.0f} | {r['s_per_image']:.2f} |"
    )


def table(results: Path) -> str:
    """The latest row of every (configuration, set, side) in a results file, as one markdown table."""
    latest = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        if r.get("seed", 0) == 0:
            latest[(r["config"], r["set"], r["side"])] = r
    return "\n".join([HEADER, *(row(latest[k]) for k in sorted(latest))])


def dataset(name: str, out: Path) -> Path:
    folder = out / "sets" / name
    return next((p.parent for p in folder.glob("*/train")), None) or SETS[name][0](folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--sides", default="ours,hiad")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "reference")
    parser.add_argument("--seeds", default="0", help="seeds (both sides); the table shows seed 0, others the spread")
    parser.add_argument("--table", action="store_true", help="only print the table of OUT/results.jsonl (seed 0)")
    args = parser.parse_args()
    if args.table:
        print(table(args.out / "results.jsonl"))
        return
    print(HEADER, flush=True)
    for set_name in args.sets.split(","):
        root = dataset(set_name, args.out)
        train, test = read_mvtec(root, "train"), read_mvtec(root, "test")
        image_size, patch_size = SETS[set_name][1:]
        for name, seed in ((n, int(s)) for n in args.configs.split(",") for s in args.seeds.split(",")):
            cfg = our_config(name, image_size, patch_size, seed)
            work = args.out / "runs" / set_name
            work.mkdir(parents=True, exist_ok=True)
            for side in args.sides.split(","):
                result = run_ours(cfg, train, test) if side == "ours" else run_hiad(name, cfg, train, test, work)
                r = {"config": name, "detector": cfg.detector, "set": set_name, "side": side, "seed": seed, **result}
                with (args.out / "results.jsonl").open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(row(r), flush=True)


if __name__ == "__main__":
    main()
