"""The detector table of issue #8 on the ELPV demo: each detector's CPU setting trained with the same
seed on the same data, evaluated (image AUROC, pixel AUROC, AUPRO), with train time and the epoch
the validation set selected; with --export, the bundle's size and `hiad-runtime bench` latency per
2048^2 image as well; with --pipeline, the size of the whole-image graph the export then adds.

Run: .venv/bin/python benchmarks/detector_table.py [--data data/elpv] [--export [--pipeline [--pipeline-memory MB]]]
     [--only patchcore,padim] [--quick]   (--quick: 1 epoch and 2 training images, for latency and size only:
     accuracy is meaningless)
Each row runs in its own process (`hiad-train`, `hiad-export`, `hiad-runtime bench`); results go to
models/detector_table/<name>/ and the table is printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # detector -> its CPU setting for the demo
    "patchcore": "demo.yaml",
    "padim": "padim_cpu.yaml",
    "fastflow": "fastflow_cpu.yaml",
    "rdpp": "rdpp_cpu.yaml",
    "destseg": "destseg_cpu.yaml",
}


def run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def tool(name: str) -> list[str]:
    module = {"hiad-train": "hiad_train.cli", "hiad-export": "hiad_export.cli", "hiad-runtime": "hiad_runtime.cli"}[
        name
    ]
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import main; main()"]


def quick_config(path: Path, out: Path) -> Path:
    cfg = yaml.safe_load(path.read_text())
    section = cfg.setdefault("patch", {})
    for key in ("total_epochs", "num_epochs"):
        if key in section:
            section[key] = 1
    if "de_st_epochs" in section:
        section["de_st_epochs"], section["total_epochs"] = 1, 2
    cfg["val_config"] = None
    out.write_text(yaml.safe_dump(cfg))
    return out


def quick_data(data: Path, out: Path) -> Path:
    """The demo with 2 training images (test split unchanged)."""
    if not out.is_dir():
        shutil.copytree(data / "test", out / "test")
        shutil.copytree(data / "ground_truth", out / "ground_truth")
        (out / "train" / "good").mkdir(parents=True)
        for f in sorted((data / "train" / "good").iterdir())[:2]:
            shutil.copy(f, out / "train" / "good" / f.name)
    return out


def row(
    name: str, data: Path, out: Path, export: bool, quick: bool, config: Path | None = None, pipeline: tuple = ()
) -> dict:
    config = config or ROOT / "configs" / CONFIGS[name]
    if quick:
        config = quick_config(config, out.parent / f"{name}_quick.yaml")
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    run(*tool("hiad-train"), "train", config, "--data", data, "--out", out, *([] if quick else ["--eval"]))
    wall = time.perf_counter() - t0
    nan = float("nan")
    metrics = (
        {"image_auroc": nan, "pixel_auroc": nan, "aupro": nan}
        if quick
        else json.loads((out / "eval_torch" / "metrics.json").read_text())
    )
    meta = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    epochs = sorted({r.get("selected_epoch") for r in meta["training"].values() if r.get("selected_epoch")})
    result = {
        "detector": name,
        "config": config.name,
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "aupro": metrics["aupro"],
        "train_s": json.loads((out / "train.json").read_text())["train_seconds"],
        "run_s": wall,
        "selected_epochs": epochs,
        "tasks": len(meta["tasks"]),
    }
    if export:
        t0 = time.perf_counter()
        run(*tool("hiad-export"), out / "checkpoint", "--out", out / "bundle", *pipeline)
        result["export_s"] = time.perf_counter() - t0
        bundle = (out / "bundle").resolve()
        graph = set(bundle.glob("pipeline.onnx*"))  # the whole-image graph (and its external data)
        result["bundle_mb"] = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file() and f not in graph) / 1e6
        result["pipeline_mb"] = sum(f.stat().st_size for f in graph) / 1e6 if pipeline else None
        result["pipeline"] = json.loads((bundle / "manifest.json").read_text())["pipeline"]["unsupported"] or "built"
        image = sorted((data / "test" / "good").iterdir())[0]
        run(*tool("hiad-runtime"), "bench", bundle, image, "--repeat", "5", "--json", out / "bench.json")
        bench = json.loads((out / "bench.json").read_text())
        result["latency_ms"] = bench["stages_ms"]["total"]["median"]
        result["peak_rss_mb"] = bench["peak_rss_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "elpv")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "detector_table")
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--export", action="store_true", help="also export and bench each bundle")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 2 training images: latency and size only")
    parser.add_argument(
        "--config", type=Path, help="another config for the one detector of --only (e.g. with fusion + thumbnail)"
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="--export: also build the whole-image graph, its size a column"
    )
    parser.add_argument(
        "--pipeline-memory", type=float, help="--pipeline: the export's budget for it, MB (hiad-export's default)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = quick_data(args.data, args.out / "quick_data") if args.quick else args.data
    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, data {data}{' (quick)' if args.quick else ''}")
    pipeline = (
        ("--pipeline", *(("--pipeline-memory", args.pipeline_memory) if args.pipeline_memory else ()))
        if args.pipeline
        else ()
    )
    print(
        "| detector | config | tasks | image AUROC | pixel AUROC | AUPRO | train s | selected epoch(s) | bundle MB "
        "(no pipeline.onnx) | pipeline.onnx MB | export s | ms / 2048^2 image | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.only.split(","):
        r = row(name, data, args.out / name, args.export, args.quick, args.config, pipeline)
        (args.out / f"{name}.json").write_text(json.dumps(r, indent=1))
        cells = [
            r["detector"],
            r["config"],
            r["tasks"],
            f"{r['image_auroc']:.4f}",
            f"{r['pixel_auroc']:.4f}",
            f"{r['aupro']:.4f}",
            f"{r['train_s']:.0f}",
            ",".join(map(str, r["selected_epochs"])) or "-",
            f"{r['bundle_mb']:.1f}" if "bundle_mb" in r else "-",
            "-"
            if r.get("pipeline_mb") is None
            else f"{r['pipeline_mb']:.1f}"
            if r["pipeline"] == "built"
            else r["pipeline"][:100],
            f"{r['export_s']:.0f}" if "export_s" in r else "-",
            f"{r['latency_ms']:.0f}" if "latency_ms" in r else "-",
            f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-",
        ]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
