"""The runtime on ONNX Runtime's CUDA provider: train the demo, export it, measure, print one table.

Run by `benchmarks/gpu_check.sh check` on a GPU machine once what it lacks is installed. The demo is trained
twice, `hiad-train --device cuda --eval` then `--device cpu --eval` (seconds of each command, the test split's
AUROC of each, and the share of the CPU memory banks' rows the CUDA banks hold); the CUDA run is exported.
Training and export run with the machine's CPU onnxruntime (`--site` on the path), the runtime in a fresh,
torch-free process with onnxruntime-gpu first (`--ort`). Figures, from decoded 2048^2 arrays (no decoding
timed): latency at one tile per embedder call, images/s with a chunk of 16 tiles per call, with 4 concurrent
streams on one Inspector and with the whole-image graph (one session call per image, counted); parity CUDA vs
CPU (the same graphs, the heads' graphs on both) as the largest map difference over the CPU map's range; GPU
memory used (nvidia-smi, peak while a setting runs, over what was used before). The JSON goes to
$OUT/gpu_check.json where OUT is set.
A benchmark, not a test: it prints figures and asserts nothing but the parity contract (1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4
CUDA = "CUDAExecutionProvider"


def step(what: str, cmd: list[str], env: dict) -> float:
    print(f"== {what}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def gpu_memory_mb() -> float:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.split()[0])


class PeakMemory:
    """The most GPU memory nvidia-smi reports while the block runs, over what was used before it."""

    def __enter__(self):
        self.base = self.peak = gpu_memory_mb()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.done.wait(0.1):
            self.peak = max(self.peak, gpu_memory_mb())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, gpu_memory_mb())
        self.mb = self.peak - self.base


def timed(inspector, images: list, repeat: int, streams: int = 1) -> dict:
    """Median and p95 ms per image and images/s over `repeat` predictions per stream, after 3 warm-ups."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    warmups = images[:3]
    for image in warmups:
        inspector.predict(image)
    seconds: list[float] = []

    def run(stream: int):
        for i in range(repeat):
            t0 = time.perf_counter()
            inspector.predict(images[(stream + i) % len(images)])
            seconds.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(run, range(streams)))
    wall = time.perf_counter() - t0
    return {
        "median_ms": float(np.median(seconds) * 1000),
        "p95_ms": float(np.percentile(seconds, 95) * 1000),
        "images_per_s": streams * repeat / wall,
        "predictions": len(warmups) + len(seconds),
    }


def measure(bundle: Path, image_paths: list[Path], repeat: int) -> dict:
    """The runtime's figures on CUDA; this process imports no torch."""
    import numpy as np
    import onnxruntime as ort

    from hiad_runtime.inspector import Inspector

    offered = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}, offers {offered}", flush=True)
    if CUDA not in offered:
        raise SystemExit("no CUDAExecutionProvider: the onnxruntime-gpu wheel did not install or load")
    cpu_options = {"backend": "onnxruntime", "providers": ("CPUExecutionProvider",), "head_path": "onnx"}
    figures: dict = {"onnxruntime": ort.__version__, "settings": {}, "parity": {}}
    images = None
    for name, options in {
        "tiles, batch 1": {"batch_size": 1},
        "tiles, batch 16": {"batch_size": 16},
        "tiles, batch 16, 4 streams": {"batch_size": 16, "streams": 4},
        "pipeline": {"engine": "pipeline"},
    }.items():
        streams = options.pop("streams", 1)
        with PeakMemory() as memory:
            inspector = Inspector.load(bundle, **options)  # backend and head path: auto
            if CUDA not in inspector.providers_in_use:
                ort.print_debug_info()  # which CUDA and cuDNN libraries it found and loaded
                raise SystemExit(f"{name}: the sessions fell back to {inspector.providers_in_use} (CUDA libraries?)")
            if images is None:
                images = [inspector.decode(p) for p in image_paths]
            calls = []
            if name == "pipeline":  # count the session calls per image
                run = inspector.engine.session.run
                inspector.engine.session.run = lambda *a: calls.append(1) or run(*a)
            row = timed(inspector, images, repeat, streams)
        tiles = inspector.options.engine.value == "tiles"  # head path and batch apply to the tile engine only
        row.update(
            gpu_mb=memory.mb,
            providers=inspector.providers_in_use,
            head_path=inspector.options.head_path.value if tiles else "-",
            batch=inspector.options.batch_size if tiles else "-",
        )
        if calls:
            row["session_calls_per_image"] = len(calls) / row["predictions"]
        if tiles:  # where the embedder writes a chunk's features (and the heads' graphs read them)
            row["features"] = inspector.engine.tile_features(images[0], {}).device[0]
        figures["settings"][name] = row
        print(name, json.dumps(row), flush=True)
        if name in ("tiles, batch 16", "pipeline"):  # parity with the same graphs on the CPU
            cpu = Inspector.load(bundle, **cpu_options, engine=inspector.options.engine)
            worst_map = worst_score = 0.0
            for image in images[:3]:
                a, b = inspector.predict(image), cpu.predict(image)
                span = float(b.anomaly_map.max() - b.anomaly_map.min())
                worst_map = max(worst_map, float(np.abs(a.anomaly_map - b.anomaly_map).max()) / span)
                worst_score = max(worst_score, abs(a.score - b.score) / span)
            figures["parity"][inspector.options.engine.value] = {"map": worst_map, "score": worst_score}
            print(
                f"parity {inspector.options.engine.value}: map {worst_map:.2e}, score {worst_score:.2e} of the range",
                flush=True,
            )
            del cpu
        del inspector
    return figures


def table(figures: dict) -> str:
    lines = [f"{'setting':<28} {'median ms':>10} {'p95 ms':>8} {'images/s':>9} {'GPU MB':>8}  head path, batch"]
    for name, r in figures["settings"].items():
        extra = f", {r['session_calls_per_image']:.0f} session call/image" if "session_calls_per_image" in r else ""
        extra += f", features on {r['features']}" if "features" in r else ""
        lines.append(
            f"{name:<28} {r['median_ms']:>10.1f} {r['p95_ms']:>8.1f} {r['images_per_s']:>9.2f} "
            f"{r['gpu_mb']:>8.0f}  {r['head_path']}, {r['batch']}{extra}"
        )
    for engine, p in figures["parity"].items():
        ok = "ok" if max(p.values()) <= TOLERANCE else f"ABOVE {TOLERANCE}"
        lines.append(f"parity CUDA vs CPU, {engine}: map {p['map']:.2e}, score {p['score']:.2e} of the range ({ok})")
    for where in ("cuda", "cpu"):
        t = figures["train"][where]
        lines.append(
            f"train on {where}: {t['train_seconds']:.1f} s training ({t['seconds']:.0f} s the command, with --eval), "
            f"image AUROC {t['image_auroc']:.4f}, "
            f"pixel AUROC {t.get('pixel_auroc', float('nan')):.4f}"
        )
    lines.append(f"memory banks, CUDA vs CPU: {figures['train']['bank_overlap']:.3f} of the CPU rows found on CUDA")
    lines.append(f"export: {figures['export']['seconds']:.0f} s {figures['export']['how']}")
    return "\n".join(lines)


def bank_overlap(gpu: Path, cpu: Path) -> float:
    """Share of the CPU-trained memory banks' rows that the CUDA-trained banks hold too (nearest row within
    1e-4 of the bank's mean row norm): the coreset picks, as far as float rounding lets them agree."""
    import numpy as np
    from safetensors.numpy import load_file

    found = total = 0
    for path in sorted((cpu / "tasks").glob("*.safetensors")):
        a, b = (load_file(p)["memory_bank"].astype(np.float64) for p in (path, gpu / "tasks" / path.name))
        d2 = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]
        nearest = np.sqrt(np.clip(d2.min(1), 0, None))
        found += int((nearest <= 1e-4 * np.linalg.norm(a, axis=1).mean()).sum())
        total += len(a)
    return found / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the demo data (MVTec layout)")
    parser.add_argument("--work", type=Path, required=True, help="where the run and bundle go")
    parser.add_argument("--site", type=Path, required=True, help="the carried packages but onnxruntime-gpu")
    parser.add_argument("--ort", type=Path, required=True, help="onnxruntime-gpu, installed apart")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--measure", type=Path, help="(internal) the bundle to measure in this process")
    args = parser.parse_args()
    images = sorted((args.data / "test").glob("*/*.png"))[:8]
    if args.measure:
        (args.work / "figures.json").write_text(json.dumps(measure(args.measure, images, args.repeat)))
        return
    python, path = sys.executable, os.environ.get("PYTHONPATH", "")
    cpu_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.site), str(ROOT), path]))}
    gpu_env = {**cpu_env, "PYTHONPATH": os.pathsep.join([str(args.ort), cpu_env["PYTHONPATH"]])}
    figures = {"train": {}}
    for where in ("cuda", "cpu"):  # the demo trained on the GPU, then on this machine's CPUs, both evaluated
        figures["train"][where] = {
            "seconds": step(
                f"train on {where}",
                [python, "-m", "hiad_train.cli", "train", "configs/demo.yaml", "--data", str(args.data)]
                + ["--out", str(args.work / where), "--device", where, "--eval"],
                cpu_env,
            ),
            "train_seconds": json.loads((args.work / where / "train.json").read_text())["train_seconds"],
            **json.loads((args.work / where / "eval_torch" / "metrics.json").read_text()),
        }
    figures["train"]["bank_overlap"] = bank_overlap(args.work / "cuda" / "checkpoint", args.work / "cpu" / "checkpoint")
    run = args.work / "cuda"
    figures["export"] = {"how": "fp32, exact Flat k-NN, --pipeline; parity vs PyTorch on the CPU onnxruntime"}
    figures["export"]["seconds"] = step(
        "export",
        [python, "-m", "hiad_export.cli", str(run / "checkpoint"), "--out", str(run / "bundle"), "--pipeline"],
        cpu_env,
    )
    step(
        "runtime on CUDA",
        [
            python,
            __file__,
            "--data",
            str(args.data),
            "--work",
            str(args.work),
            "--site",
            str(args.site),
            "--ort",
            str(args.ort),
            "--repeat",
            str(args.repeat),
            "--measure",
            str(run / "bundle"),
        ],
        gpu_env,
    )
    figures.update(json.loads((args.work / "figures.json").read_text()))
    print(table(figures))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
