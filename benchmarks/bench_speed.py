"""Edge-speed benchmark (issue #10): precision x engine, memory arena, prefetching, 8192^2 streaming,
int8 accuracy, and training under contention. One command, prints markdown tables; every ratio is
measured within this one run, with the machine's load average next to it.

    .venv/bin/python benchmarks/bench_speed.py [--checkpoint models/demo/checkpoint] [--data data/elpv]
        [--repeat 5] [--skip large,accuracy,training]

Needs the demo checkpoint (`make demo`). Bundles and data go to a temporary folder. A benchmark that
prints figures (docs/benchmarks.md records them), not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

ARENA_SNIPPET = """
import json, resource, sys, time
import numpy as np
import hiad_runtime.backends.onnxruntime as ort_backend
import hiad_runtime.inspector as ins
from hiad_runtime.image import load_image
allowed = sys.argv[3] == "on"
create = ort_backend.OnnxRuntimeBackend.create
ort_backend.OnnxRuntimeBackend.create = lambda self, path, arena=False: create(self, path, allowed and arena)
inspector = ins.Inspector.load(sys.argv[1], backend='onnxruntime')
image = load_image(sys.argv[2])
inspector.predict(image)
backbone, total = [], []
for _ in range(int(sys.argv[4])):
    t = time.perf_counter()
    r = inspector.predict(image)
    total.append(time.perf_counter() - t)
    backbone.append(r.timings["backbone"])
print(json.dumps({"backbone_ms": float(np.median(backbone) * 1000), "total_ms": float(np.median(total) * 1000),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

BUSY = "while True: pass"


def load() -> str:
    return "load {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def run(*args, env: dict | None = None) -> str:
    return run_measured(*args, env=env)[0]


def run_measured(*args, env: dict | None = None) -> tuple[str, float]:
    """stdout and the process's peak RSS in MB (its own rusage from wait4, whatever ran before)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(a) for a in args], stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, args))} failed:\n{err.read()[-3000:]}")
        return out.read(), usage.ru_maxrss / 1024


def bench(bundle: Path, *extra, work: Path, name: str) -> dict:
    out = work / f"{name}.json"
    run(BIN / "hiad-runtime", "bench", bundle, *extra, "--json", out)
    return json.loads(out.read_text())


def accuracy(bundle: Path, data: Path, work: Path, name: str, *extra) -> dict:
    pred = work / f"{name}_pred"
    run(BIN / "hiad-runtime", "predict", bundle, data / "test", "--out", pred, *extra)
    run(BIN / "hiad-train", "eval-runtime", pred, "--data", data)
    return json.loads((pred / "metrics.json").read_text())


def export(checkpoint: Path, out: Path, *extra) -> Path:
    run(BIN / "hiad-export", checkpoint, "--out", out, *extra)
    return out


def export_measured(checkpoint: Path, out: Path, *extra) -> tuple[Path, float]:
    """The bundle and the export's peak RSS in MB."""
    return out, run_measured(BIN / "hiad-export", checkpoint, "--out", out, *extra)[1]


def stage(fig: dict, s: str) -> float:
    return fig["stages_ms"][s]["median"]


def section_precision_engines(checkpoint: Path, image: Path, work: Path, repeat: int) -> dict[str, Path]:
    bundles = {
        p: export(checkpoint, work / f"demo_{p}", "--precision", p, "--images", image) for p in ("fp32", "int8", "fp16")
    }
    engines = ["onnxruntime"]
    try:
        import openvino  # noqa: F401

        engines.append("openvino")
    except ImportError:
        print("(openvino not installed: its rows are skipped)")
    rows = []
    for engine in engines:
        for p, b in bundles.items():
            rows.append(
                (
                    p,
                    engine,
                    bench(b, image, "--repeat", repeat, "--backend", engine, work=work, name=f"{p}_{engine}"),
                    load(),
                )
            )
    fp32_backbone = stage(rows[0][2], "backbone")
    print(
        f"\n### Precision x backend (2048^2, 16 tiles, O2O PatchCore, exact Flat k-NN, {repeat} runs, PNG decoded "
        "inline)"
    )
    print(
        "| embedder | backend | decode ms | backbone ms | scoring ms | total ms | total / fp32-ORT backbone | peak "
        "RSS MB | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for p, engine, fig, ld in rows:
        print(
            f"| {p} | {engine} | {stage(fig, 'decode'):.0f} | {stage(fig, 'backbone'):.0f} | "
            f"{stage(fig, 'scoring'):.0f} | "
            f"{stage(fig, 'total'):.0f} | {stage(fig, 'total') / fp32_backbone:.2f} | {fig['peak_rss_mb']:.0f} | {ld} |"
        )
    for p, b in bundles.items():
        parity = json.loads((b / "manifest.json").read_text())["parity"]
        print(
            f"parity {p}: "
            + "; ".join(
                f"{k} {v['max_rel_map_diff']:.2e} of range ({'enforced' if v['enforced'] else 'recorded'})"
                for k, v in parity.items()
                if isinstance(v, dict)
            )
        )
    return bundles


def section_openvino_parity(bundle: Path, image: Path) -> None:
    snippet = (
        "import sys, numpy as np\nfrom hiad_runtime.inspector import Inspector\n"
        "a = Inspector.load(sys.argv[1], backend='onnxruntime').predict(sys.argv[2]); b = "
        "Inspector.load(sys.argv[1], backend='openvino').predict(sys.argv[2])\n"
        "print(f'{np.abs(a.anomaly_map - b.anomaly_map).max() / np.ptp(a.anomaly_map):.2e} {abs(a.score - b.score) / "
        "np.ptp(a.anomaly_map):.2e}')"
    )
    try:
        m, s = run(BIN / "python", "-c", snippet, bundle, image).split()
    except SystemExit as e:
        print(f"openvino parity not measured: {str(e)[-300:]}")
        return
    print(f"OpenVINO vs ONNX Runtime on the fp32 bundle: map {m} of range, score {s}")


def section_arena(bundle: Path, image: Path, repeat: int) -> None:
    print(f"\n### Memory arena (fp32 bundle, {repeat} runs, each setting in its own process)")
    print("| arena | backbone ms | total ms | peak RSS MB | load |\n|---|---|---|---|---|")
    for setting, label in (("off", "off for every session (before)"), ("on", "on for the embedder only (now)")):
        fig = json.loads(run(BIN / "python", "-c", ARENA_SNIPPET, bundle, image, setting, repeat))
        print(f"| {label} | {fig['backbone_ms']:.0f} | {fig['total_ms']:.0f} | {fig['peak_rss_mb']:.0f} | {load()} |")


def section_prefetch(bundle: Path, test_dir: Path, work: Path, repeat: int) -> None:
    print(f"\n### Throughput: decoding the next image during inference (int8 bundle, {repeat} runs over the test PNGs)")
    print("| prefetch | images/s | latency median ms (incl. waiting for the image) | load |\n|---|---|---|---|")
    for depth in (0, 1, 2):
        fig = bench(bundle, test_dir, "--repeat", repeat, "--prefetch", depth, work=work, name=f"prefetch{depth}")
        print(f"| {depth} | {fig['images_per_s']:.2f} | {stage(fig, 'total'):.0f} | {load()} |")


def section_large(data: Path, work: Path, repeat: int) -> None:
    """The same 2 demo modules at 2048^2 and upscaled 4x to 8192^2 (16 vs 256 O2O tasks), fp32 exact
    bundles, streamed 16 tiles at a time; latency per tile should not grow, nor memory with tiles.
    8192^2 runs twice: every head resident (the default budget holds this bundle's 256), and heads
    loaded per chunk (a 32 MB budget, what a bundle trained on more images gets by default).
    Training, export and runtime each print their peak RSS (the export builds no whole-image graph:
    at 8192^2 it would need about 16 GB, docs/benchmarks.md)."""
    import cv2

    figures, train, exported = {}, {}, {}
    for size in (2048, 8192):
        root = work / f"elpv{size}"
        for split in ("train/good", "test/good"):
            (root / split).mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(sorted((data / "train" / "good").glob("*.png"))[:2]):
            cv2.imwrite(str(root / "train/good" / f"m{i}.png"), cv2.resize(cv2.imread(str(f)), (size, size)))
        test = root / "test/good/m.png"
        cv2.imwrite(str(test), cv2.resize(cv2.imread(str(data / "test" / "defect" / "module_005.png")), (size, size)))
        config = work / f"large{size}.yaml"
        config.write_text(
            (ROOT / "configs" / "demo.yaml").read_text().replace("image_size: 2048", f"image_size: {size}")
        )
        t0 = time.perf_counter()
        _, train_mb = run_measured(BIN / "hiad-train", config, "--data", root, "--out", work / f"large{size}")
        train[size] = (time.perf_counter() - t0, train_mb, load())
        t0 = time.perf_counter()
        bundle, export_mb = export_measured(
            work / f"large{size}" / "checkpoint", work / f"large{size}_fp32", "--images", test
        )
        exported[size] = (time.perf_counter() - t0, export_mb, load())
        budgets = {"resident": ()} if size == 2048 else {"resident": (), "per chunk": ("--head-memory", 32)}
        for label, extra in budgets.items():
            figures[size, label] = (
                bench(bundle, test, "--repeat", repeat, *extra, work=work, name=f"large{size}_{label}"),
                load(),
            )
    print(
        "\n### Images larger than 2048^2: 2 demo modules at 2048^2 and at 8192^2 (fp32, exact Flat, streamed 16 "
        f"tiles at a time, batch 1, {repeat} runs)"
    )
    print("| image | training s / peak RSS MB (2 images) | export s / peak RSS MB | load |\n|---|---|---|---|")
    for size in (2048, 8192):
        print(
            f"| {size}^2 | {train[size][0]:.0f} / {train[size][1]:.0f} | {exported[size][0]:.0f} / "
            f"{exported[size][1]:.0f} | "
            f"{train[size][2]}; {exported[size][2]} |"
        )
    print(
        "| image | tiles | heads | head loads | decode ms | backbone ms | scoring ms | post ms | total ms | ms per "
        "tile | peak RSS MB | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (size, label), (fig, ld) in figures.items():
        print(
            f"| {size}^2 | {fig['tiles']} | {label} | {fig['head_loads']} | {stage(fig, 'decode'):.0f} | "
            f"{stage(fig, 'backbone'):.0f} | {stage(fig, 'scoring'):.0f} | {stage(fig, 'post'):.0f} | "
            f"{stage(fig, 'total'):.0f} | "
            f"{stage(fig, 'total') / fig['tiles']:.1f} | {fig['peak_rss_mb']:.0f} | {ld} |"
        )
    for label in ("resident", "per chunk"):
        fig = figures[8192, label][0]
        ratio = stage(fig, "total") / (16 * stage(figures[2048, "resident"][0], "total"))
        print(
            f"8192^2 ({label} heads) total / (16 x 2048^2 total) = {ratio:.2f}; peak RSS: export "
            f"{exported[8192][1]:.0f} MB, "
            f"runtime {fig['peak_rss_mb']:.0f} MB"
        )


def section_accuracy(bundles: dict[str, Path], data: Path, work: Path) -> list:
    rows = [("ELPV demo", p, accuracy(bundles[p], data, work, f"acc_{p}")) for p in ("fp32", "int8")]
    return rows


def synthetic_accuracy(work: Path) -> list:
    from hiad_train.data.textures import build_synthetic

    syn = build_synthetic(work / "syn", size=(2048, 2048), n_train=8, n_test=10)
    run(BIN / "hiad-train", ROOT / "configs" / "demo.yaml", "--data", syn, "--out", work / "syn_model")
    ckpt = work / "syn_model" / "checkpoint"
    image = next((syn / "test" / "defect").glob("*.png"))
    rows = []
    for p in ("fp32", "int8"):
        b = export(ckpt, work / f"syn_{p}", "--precision", p, "--images", image)
        rows.append(("synthetic brick, exact masks", p, accuracy(b, syn, work, f"syn_acc_{p}")))
    return rows


CORESET_SNIPPET = """
import contextlib, sys, time, torch
import hiad_train.components.coreset as c
threads = int(sys.argv[1])
c.torch_threads = lambda n: contextlib.nullcontext()  # the loop runs on `threads` threads
torch.set_num_threads(threads)
x = torch.randn(32768, 128, generator=torch.Generator().manual_seed(0))
c.greedy_coreset(x, 100 / 32768)
t = time.perf_counter(); c.greedy_coreset(x, 1000 / 32768); print(1000 / (time.perf_counter() - t))
"""


def section_coreset() -> None:
    """Picks/s of the coreset loop (32768 x 128 features) on 2 threads (before) and 1 (now), alone and with a
    competitor."""
    print("\n### Coreset sampler under contention (picks/s, 32768 x 128 features, 1000 picks)")
    print("| loop threads | alone | with one CPU-bound process | load |\n|---|---|---|---|")
    for threads in (2, 1):
        rates = []
        for competitors in (0, 1):
            procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
            try:
                rates.append(float(run(BIN / "python", "-c", CORESET_SNIPPET, threads)))
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
        print(f"| {threads}{' (before)' if threads == 2 else ' (now)'} | {rates[0]:.0f} | {rates[1]:.0f} | {load()} |")


def training_contention() -> None:
    print("\n### Training under contention (benchmarks/bench_train.py: 8 images at 2048^2, 16 O2O tasks)")
    print("| | wall s | features s | coreset s | load before |\n|---|---|---|---|---|")
    results = []
    for label, competitors in (("alone", 0), ("with one CPU-bound process", 1)):
        procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
        try:
            ld = load()
            out = run(BIN / "python", ROOT / "benchmarks" / "bench_train.py")
        finally:
            for p in procs:
                p.kill()
                p.wait()
        line = next(x for x in out.splitlines() if x.startswith("wall:"))
        wall = float(line.split()[1])
        feats = float(line.split("features ")[1].split()[0])
        core = float(line.split("coreset ")[1].split()[0])
        results.append(wall)
        print(f"| {label} | {wall:.1f} | {feats:.1f} | {core:.1f} | {ld} |")
    print(f"ratio with / without the competitor: {results[1] / results[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "demo" / "checkpoint")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "elpv")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated: engines,arena,prefetch,large,accuracy,training")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="hiad-speed-"))
    image = args.data / "test" / "defect" / "module_005.png"
    print(f"{os.cpu_count()} CPUs; {load()} at start; work folder {work}")
    if "training" not in skip:
        section_coreset()
        training_contention()
    if "large" not in skip:
        section_large(args.data, work, args.repeat)
    if skip >= {"engines", "arena", "prefetch", "accuracy"}:
        return
    if not args.checkpoint.is_dir():
        raise SystemExit(f"{args.checkpoint}: run `make demo` first (or pass --checkpoint)")
    bundles = section_precision_engines(args.checkpoint, image, work, args.repeat)
    if "engines" not in skip:
        section_openvino_parity(bundles["fp32"], image)
    if "arena" not in skip:
        section_arena(bundles["fp32"], image, args.repeat)
    if "prefetch" not in skip:
        section_prefetch(bundles["int8"], args.data / "test", work, args.repeat)
    if "accuracy" not in skip:
        rows = section_accuracy(bundles, args.data, work) + synthetic_accuracy(work)
        print("\n### Accuracy of the int8 embedder (runtime predictions, `hiad-train eval-runtime`)")
        print("| data | embedder | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|---|")
        for data, p, m in rows:
            print(f"| {data} | {p} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['aupro']:.4f} |")


if __name__ == "__main__":
    main()
