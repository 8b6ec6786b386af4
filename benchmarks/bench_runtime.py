"""Runtime benchmark on the demo checkpoint: the torch-free runtime (per stage, per faiss index
choice, with the accuracy each choice costs) next to PyTorch inference of the same checkpoint,
each in its own process so peak RSS is its own.

Run after `make demo`:  .venv/bin/python benchmarks/bench_runtime.py [--repeat N]
A benchmark that prints figures (docs/benchmarks.md records them), not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO = ROOT / "models" / "demo"
DATA = ROOT / "data" / "elpv"
IMAGE = DATA / "test" / "defect" / "module_005.png"

INDEXES = [
    ("Flat", ""),
    ("IVF64,Flat", "nprobe=8"),
    ("IVF64,Flat", "nprobe=4"),
    ("IVF64,SQ8", "nprobe=4"),
    ("HNSW32", "efSearch=16"),
]

TORCH_SNIPPET = """
import json, resource, sys, time
import numpy as np, torch
from hiad_runtime.image import load_image
from hiad_runtime.geometry import split
from hiad_train.checkpoint import load_checkpoint
from hiad_train.model import embed
model = load_checkpoint(sys.argv[1])
image = load_image(sys.argv[2])
repeat = int(sys.argv[3])
model.predict(image)
total, backbone = [], []
for _ in range(repeat):
    t = time.perf_counter(); model.predict(image); total.append(time.perf_counter() - t)
    t = time.perf_counter()
    embed(model.embedder, split(image, model.tiling.tiles), 4)
    backbone.append(time.perf_counter() - t)
print(json.dumps({"total_ms": float(np.median(total) * 1000), "backbone_ms": float(np.median(backbone) * 1000),
                  "threads": torch.get_num_threads(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(*args: str) -> str:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    if not (DEMO / "checkpoint").is_dir():
        raise SystemExit("run `make demo` first (it trains models/demo/checkpoint)")
    work = Path(tempfile.mkdtemp(prefix="hiad-bench-"))
    rows = []
    for factory, search in INDEXES:
        name = factory.replace(",", "_") + (f"_{search.replace('=', '')}" if search else "")
        bundle = work / name
        run(
            BIN / "hiad-export",
            DEMO / "checkpoint",
            "--out",
            bundle,
            "--index",
            factory,
            "--search",
            search,
            "--images",
            IMAGE,
        )
        run(BIN / "hiad-runtime", "bench", bundle, IMAGE, "--repeat", args.repeat, "--json", work / f"{name}.json")
        run(BIN / "hiad-runtime", "predict", bundle, DATA / "test", "--out", work / f"{name}_pred")
        run(BIN / "hiad-train", "eval-runtime", work / f"{name}_pred", "--data", DATA)
        figures = json.loads((work / f"{name}.json").read_text())
        metrics = json.loads((work / f"{name}_pred" / "metrics.json").read_text())
        rows.append((f"{factory} {search}".strip(), figures, metrics))
    torch_fig = json.loads(
        run(BIN / "python", "-c", TORCH_SNIPPET, DEMO / "checkpoint", IMAGE, max(3, args.repeat // 3))
    )

    s = rows[0][1]["stages_ms"]
    print(f"\nruntime (onnxruntime + faiss Flat, batch 4), {args.repeat} runs on {IMAGE.name}:")
    print("| stage | median ms | p95 ms |\n|---|---|---|")
    for stage, v in s.items():
        print(f"| {stage} | {v['median']:.1f} | {v['p95']:.1f} |")
    print(f"images/s {rows[0][1]['images_per_s']:.2f}, peak RSS {rows[0][1]['peak_rss_mb']:.0f} MB")
    print(
        f"\nPyTorch inference of the same checkpoint ({torch_fig['threads']} threads): "
        f"{torch_fig['total_ms']:.0f} ms/image (backbone alone {torch_fig['backbone_ms']:.0f} ms), peak RSS "
        f"{torch_fig['peak_rss_mb']:.0f} MB"
    )
    print(
        "\n| faiss index | backbone ms | scoring ms | total ms | total / backbone | peak RSS MB | image AUROC | "
        "pixel AUROC | AUPRO |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, fig, met in rows:
        st = fig["stages_ms"]
        print(
            f"| {label} | {st['backbone']['median']:.0f} | {st['scoring']['median']:.0f} | "
            f"{st['total']['median']:.0f} | "
            f"{st['total']['median'] / st['backbone']['median']:.2f} | {fig['peak_rss_mb']:.0f} | "
            f"{met['image_auroc']:.4f} | {met['pixel_auroc']:.4f} | {met['aupro']:.4f} |"
        )


if __name__ == "__main__":
    main()
