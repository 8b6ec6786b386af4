"""`hiad-runtime predict BUNDLE IMAGE_OR_DIR... --out DIR` and `hiad-runtime bench BUNDLE [IMAGES] --repeat N`."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from hiad_runtime.bundle import BundleError
from hiad_runtime.image import ImageError, load_image, resize_image

app = typer.Typer(add_completion=False, no_args_is_help=True, help="hiad-deploy inspection runtime (torch-free).")

class Engine(str, Enum):
    """tiles: stage by stage (the head path applies); pipeline: the bundle's whole-image graph, one run per image."""

    tiles = "tiles"
    pipeline = "pipeline"


class HeadPath(str, Enum):
    """How heads run: `native` uses a head kind's fast path (faiss for k-NN) where it has one."""

    native = "native"
    onnx = "onnx"


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _inputs(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(file, output key) pairs; a file found under a given directory keeps its relative path."""
    found = []
    for p in paths:
        if p.is_dir():
            found += [(f, f.relative_to(p).with_suffix("")) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        else:
            found.append((p, Path(p.stem)))
    return found


def _load(bundle: Path, **kwargs):
    from hiad_runtime.inspector import Inspector

    try:
        return Inspector.load(bundle, **kwargs)
    except BundleError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def predict(
    bundle: Path = typer.Argument(..., help="bundle folder or .tar"),
    inputs: List[Path] = typer.Argument(..., help="image files and/or folders (searched recursively)"),
    out: Path = typer.Option(..., "--out", help="results.jsonl, maps/*.npy and overlays/*.png go here"),
    overlays: bool = typer.Option(False, "--overlays", help="also write anomaly-map overlay PNGs"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="image-score threshold (overrides the bundle's)"),
    pixel_threshold: Optional[float] = typer.Option(None, "--pixel-threshold", help="pixel threshold (overrides the bundle's)"),
    head_path: HeadPath = typer.Option(HeadPath.native, "--head-path", help="native: a head kind's fast path (faiss for k-NN) where it has one; onnx: every head's exported graph"),
    engine: Engine = typer.Option(Engine.tiles, "--engine", help="tiles: stage by stage; pipeline: the bundle's whole-image graph (what the C library runs)"),
    threads: int = typer.Option(0, "--threads", help="ONNX Runtime intra-op threads (0 = all cores)"),
    batch: int = typer.Option(4, "--batch", help="tiles per ONNX Runtime call (4 keeps peak RSS under 600 MB at 512 px tiles)"),
    input_size: bool = typer.Option(False, "--input-size", help="write maps at each input's own size instead of the bundle's image_size"),
) -> None:
    """Score images; one JSON line per image, a float32 map per image."""
    from hiad_runtime.overlay import overlay, save_rgb

    inspector = _load(
        bundle, head_path=head_path.value, engine=engine.value, threads=threads, batch_size=batch,
        image_threshold=threshold, pixel_threshold=pixel_threshold,
    )
    files = _inputs(inputs)
    if not files:
        typer.secho("error: no images found in the inputs", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    with open(out / "results.jsonl", "w") as results:
        for path, key in files:
            t0 = time.perf_counter()
            try:
                image = load_image(path)
                r = inspector.predict(image)
            except (ImageError, OSError) as e:
                failures += 1
                results.write(json.dumps({"input": str(path), "error": str(e)}) + "\n")
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
                continue
            latency = (time.perf_counter() - t0) * 1000
            map_file = out / "maps" / f"{key}.npy"
            map_file.parent.mkdir(parents=True, exist_ok=True)
            np.save(map_file, (r.map_at_input_size() if input_size else r.anomaly_map).astype(np.float32), allow_pickle=False)
            if overlays:
                shown = resize_image(image, inspector.tiling.image_size)
                unit = inspector.manifest.postprocess.clip_to_unit  # normalized maps share one colour scale
                save_rgb(out / "overlays" / f"{key}.png", overlay(shown, r.anomaly_map, r.mask, *((0.0, 1.0) if unit else (None, None))))
            line = {"input": str(path), "score": r.score, "decision": r.decision, "latency_ms": round(latency, 2), "map": str(map_file.relative_to(out))}
            results.write(json.dumps(line) + "\n")
            typer.echo(f"{path}: score {r.score:.4f}" + ("" if r.decision is None else f" -> {'ANOMALOUS' if r.decision else 'ok'}") + f" ({latency:.0f} ms)")
    typer.echo(f"providers: {', '.join(inspector.providers_in_use)}; results: {out / 'results.jsonl'}")
    if failures:
        raise typer.Exit(1)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@app.command()
def bench(
    bundle: Path = typer.Argument(...),
    images: Optional[List[Path]] = typer.Argument(None, help="images to run (default: one synthetic image at the bundle's size)"),
    repeat: int = typer.Option(10, "--repeat"),
    warmup: int = typer.Option(1, "--warmup"),
    head_path: HeadPath = typer.Option(HeadPath.native, "--head-path"),
    engine: Engine = typer.Option(Engine.tiles, "--engine"),
    threads: int = typer.Option(0, "--threads"),
    batch: int = typer.Option(4, "--batch"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON"),
) -> None:
    """Per-stage latency (median, p95), images/s and peak RSS. A benchmark that prints figures."""
    from hiad_runtime.inspector import STAGES

    inspector = _load(bundle, head_path=head_path.value, engine=engine.value, threads=threads, batch_size=batch)
    stages = ("decode", "pipeline") if engine is Engine.pipeline else STAGES
    size = inspector.tiling.image_size
    if images:
        frames = [resize_image(load_image(f), size) for f, _ in _inputs(images)]
    else:
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)]
    for i in range(warmup):
        inspector.predict(frames[i % len(frames)])
    per_stage = {s: [] for s in (*stages, "total")}
    t_start = time.perf_counter()
    for i in range(repeat):
        t0 = time.perf_counter()
        r = inspector.predict(frames[i % len(frames)])
        per_stage["total"].append(time.perf_counter() - t0)
        for s in stages:
            per_stage[s].append(r.timings.get(s, 0.0))
    wall = time.perf_counter() - t_start
    figures = {
        "bundle": str(bundle),
        "image_size": list(size),
        "tiles": len(inspector.tiling.tiles),
        "tasks": len(inspector.manifest.tasks),
        "head_path": head_path.value,
        "engine": engine.value,
        "providers": inspector.providers_in_use,
        "repeat": repeat,
        "stages_ms": {s: {"median": float(np.median(v) * 1000), "p95": float(np.percentile(v, 95) * 1000)} for s, v in per_stage.items()},
        "images_per_s": repeat / wall,
        "peak_rss_mb": _peak_rss_mb(),
    }
    typer.echo(f"{figures['tiles']} tiles, {figures['tasks']} tasks, engine {engine.value}, head path {head_path.value}, providers={','.join(figures['providers'])}, {repeat} runs")
    typer.echo(f"{'stage':<9} {'median ms':>10} {'p95 ms':>10}")
    for s, v in figures["stages_ms"].items():
        typer.echo(f"{s:<9} {v['median']:>10.1f} {v['p95']:>10.1f}")
    typer.echo(f"images/s {figures['images_per_s']:.2f}; peak RSS {figures['peak_rss_mb']:.0f} MB")
    if json_out:
        json_out.write_text(json.dumps(figures, indent=1))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
