"""Bit-for-bit equality of what the code produces, before and after a change that must change no output.

`record` runs the current tree on fixed checkpoints and images and writes everything it produced into
REF: each checkpoint's bundle manifest (without `created`), PyTorch's maps and scores (HRModel.predict),
the runtime's maps and scores on every path the bundle has (tiles engine with native and ONNX heads,
the whole-image graph), a fresh tiny training's checkpoint tensors, and `hiad-runtime bench` medians.
`compare` runs the same on the current tree and reports every difference (exit 1 if any output differs;
bench medians are printed beside each other, not judged).

    python benchmarks/equality.py record  REF  --checkpoints CKPT... --images DIR --data DATA
    python benchmarks/equality.py compare REF  --checkpoints CKPT... --images DIR --data DATA
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from hiad_runtime.inspector import Inspector
from hiad_runtime.results import find_inputs


def _manifest(bundle: Path) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    m.pop("created")
    return m


def _outputs(checkpoint: Path, images: list[Path], work: Path, bench: bool) -> tuple[dict, dict[str, np.ndarray], dict]:
    """(manifest, arrays by name, bench medians) for one checkpoint."""
    from hiad_export.writer import ExportOptions, write_bundle
    from hiad_runtime.image import load_image, resize_image
    from hiad_train.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)
    pixels = [resize_image(load_image(p), model.tiling.image_size) for p in images]
    bundle = work / "bundle"
    write_bundle(model, bundle, pixels[:2], ExportOptions(pipeline=True))
    arrays = {}
    for i, image in enumerate(pixels):
        arrays[f"torch/{i}/map"], score = model.predict(image)
        arrays[f"torch/{i}/score"] = np.float64(score)
    paths = {"native": {"head_path": "native"}, "onnx": {"head_path": "onnx"}}
    if _manifest(bundle).get("pipeline", {}).get("graph"):
        paths["pipeline"] = {"engine": "pipeline"}
    for name, kwargs in paths.items():
        inspector = Inspector.load(bundle, backend="onnxruntime", **kwargs)
        for i, path in enumerate(images):
            r = inspector.predict(path)
            arrays[f"{name}/{i}/map"], arrays[f"{name}/{i}/score"] = r.anomaly_map, np.float64(r.score)
    medians = {}
    for backend in ("onnxruntime", "openvino") if bench else ():
        out = work / f"bench_{backend}.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "hiad_runtime.cli",
                "bench",
                str(bundle),
                str(images[0]),
                "--repeat",
                "5",
                "--backend",
                backend,
                "--json",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        medians[backend] = json.loads(out.read_text())["stages_ms"]["total"]["median"]
    return _manifest(bundle), arrays, medians


def _training(data: Path, work: Path) -> dict[str, np.ndarray]:
    """A fresh tiny training (fusion, thumbnail, clustering, validation): every checkpoint tensor."""
    from safetensors.numpy import load_file

    from hiad_train.checkpoint import save_checkpoint
    from hiad_train.config import parse_config
    from hiad_train.data import read_mvtec
    from hiad_train.trainer import HRTrainer

    config = parse_config(
        {
            "seed": 0,
            "image_size": 512,
            "patch_size": 256,
            "ds_factors": [0, 1],
            "fusion_weights": [0.5, 0.5],
            "batch_size": 4,
            "tasks": {"generator": "spatial_clustering", "cluster_number": 2},
            "patch": {"percentage": 0.1, "target_embed_dimension": 64},
            "thumbnail": {"thumbnail_size": 256, "target_embed_dimension": 64, "percentage": 0.1},
            "val_config": {
                "anomaly_syn_fn": {"name": "random_box", "p": 0.5},
                "val_sample_ratio": 0.25,
                "max_patch_number": 200,
            },
        },
        "equality",
    )
    model = HRTrainer(config, progress=False).fit(read_mvtec(data, "train")[:6])
    ckpt = save_checkpoint(model, work / "checkpoint")
    tensors = {}
    for f in sorted(ckpt.resolve().rglob("*.safetensors")):
        for k, v in load_file(f).items():
            tensors[f"train/{f.relative_to(ckpt.resolve())}/{k}"] = v
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    tensors["train/checkpoint.json"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    return tensors


def array_differences(before: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> list[str]:
    """Every array missing, new, or not bit-identical (np.array_equal), with its largest difference."""
    differ = [f"{k}: missing now" for k in before if k not in now]
    differ += [f"{k}: new" for k in now if k not in before]
    for k in (k for k in now if k in before):
        if now[k].shape != before[k].shape:
            differ.append(f"{k}: shape {before[k].shape} -> {now[k].shape}")
        elif not np.array_equal(now[k], before[k]):
            diff = np.abs(now[k].astype(np.float64) - before[k].astype(np.float64)).max()
            differ.append(f"{k}: max |diff| {diff:.3g}")
    return differ


def run(args) -> tuple[dict, dict[str, np.ndarray], dict]:
    images = find_inputs([args.images])[: args.count]
    manifests, arrays, bench = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, ckpt in enumerate(args.checkpoints):
            work = Path(tmp) / f"c{k}"
            work.mkdir()
            manifests[str(k)], a, bench[str(k)] = _outputs(ckpt, images, work, args.bench)
            arrays |= {f"c{k}/{name}": v for name, v in a.items()}
        arrays |= _training(args.data, Path(tmp))
    return manifests, arrays, bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["record", "compare"])
    parser.add_argument("ref", type=Path)
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="an MVTec-layout folder for the fresh training")
    parser.add_argument("--count", type=int, default=4, help="images per checkpoint")
    parser.add_argument(
        "--no-bench", dest="bench", action="store_false", help="outputs only (bench medians need a quiet box)"
    )
    args = parser.parse_args()
    manifests, arrays, bench = run(args)
    if args.mode == "record":
        args.ref.mkdir(parents=True, exist_ok=True)
        (args.ref / "manifests.json").write_text(json.dumps(manifests, indent=1, sort_keys=True))
        (args.ref / "bench.json").write_text(json.dumps(bench, indent=1))
        np.savez(args.ref / "arrays.npz", **arrays)
        print(f"recorded {len(arrays)} arrays, {len(manifests)} manifests into {args.ref}")
        return
    before_manifests = json.loads((args.ref / "manifests.json").read_text())
    before = dict(np.load(args.ref / "arrays.npz"))
    differ = [
        k
        for k in manifests
        if json.dumps(manifests[k], sort_keys=True) != json.dumps(before_manifests.get(k), sort_keys=True)
    ]
    differ = [f"manifest of checkpoint {k}" for k in differ]
    differ += array_differences(before, arrays)
    bench_before = json.loads((args.ref / "bench.json").read_text())
    for k, per_backend in bench.items():
        for backend, ms in per_backend.items():
            was = bench_before.get(k, {}).get(backend)
            if was is None:
                continue
            print(f"bench checkpoint {k} {backend}: {was:.0f} ms before, {ms:.0f} ms now ({ms / was:.3f}x)")
    print(
        f"{len(arrays)} arrays and {len(manifests)} manifests compared: "
        + ("all identical" if not differ else f"{len(differ)} differ")
    )
    for line in differ:
        print("  " + line)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
