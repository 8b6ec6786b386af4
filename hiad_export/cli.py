"""`hiad-export CHECKPOINT_DIR --out BUNDLE_DIR [--index ...] [--precision fp32|fp16|int8] [--images ...]
[--pipeline [--pipeline-memory MB]]`."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import List, Optional, Sequence

import typer

from hiad_runtime.bundle import Precision

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Turn a training checkpoint into a deployment bundle."
)


def held_back_images(paths: list[Path], data: str | None, trained: Sequence[Path] = ()) -> list[Path]:
    """Parity images: those given on the command line, else per class one test image of the training data
    that the model was not `trained` on (none when it has no test split).

    Why not trained-on images: on a tile it was fitted to, PaDiM's Mahalanobis distance with few tiles per
    task (a rank-deficient covariance) cancels to a small difference of large float32 terms, and PyTorch
    and ONNX Runtime then differ by up to 1e-2 of the map's range, an artefact of the image chosen."""
    from hiad_runtime.results import find_inputs

    files = find_inputs(paths)
    if not files and data:
        seen = {Path(f).resolve() for f in trained}
        test = Path(data) / "test"
        if test.is_dir():
            for kind in sorted(d for d in test.iterdir() if d.is_dir()):
                files += [f for f in find_inputs([kind]) if f.resolve() not in seen][:1]
    return files[:4]


def _parity_images(paths: list[Path], data: str | None, size) -> list:
    """`held_back_images`, decoded at the model's size; refused when there are none."""
    from hiad_runtime.image import load_image, resize_image

    files = held_back_images(paths, data)
    if not files:
        raise typer.BadParameter(
            "no held-back images for the parity check: pass --images DIR_OR_FILES", param_hint="--images"
        )
    return [resize_image(load_image(f), size) for f in files]


def training_images(data: str | None, size, count: int) -> list:
    """The first `count` training images the checkpoint records (int8 calibration needs no other data)."""
    from hiad_train.data import read_mvtec

    if not data:
        raise typer.BadParameter(
            "int8 calibration reads the checkpoint's training images, but it records no data folder"
        )
    try:
        samples = read_mvtec(data, "train")[:count]
    except FileNotFoundError as e:
        raise typer.BadParameter(f"int8 calibration: {e}", param_hint="--precision") from None
    return [s.image(size) for s in samples]


@app.command()
def export(
    checkpoint: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="checkpoint folder written by hiad-train"
    ),
    out: Path = typer.Option(..., "--out", help="bundle: a symlink switched atomically to each new version OUT.v<N>"),
    index: str = typer.Option(
        "Flat", "--index", help="k-NN heads' faiss index_factory string: Flat (exact), IVF64,Flat, HNSW32, SQ8, ..."
    ),
    search: str = typer.Option(
        "", "--search", help="k-NN heads' faiss search parameters, e.g. nprobe=8 or efSearch=64"
    ),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="held-back images for the parity check"),
    tolerance: float = typer.Option(
        1e-4, "--tolerance", min=0.0, help="max map difference relative to the map's range"
    ),
    archive: bool = typer.Option(False, "--archive", help="also write OUT.tar (the full name plus .tar)"),
    precision: Precision = typer.Option(
        Precision.fp32,
        "--precision",
        help=(
            "embedder graphs: fp32; int8 (static QDQ, calibrated on the training images; fastest on CPU); fp16 (for "
            "GPU providers)"
        ),
    ),
    calibration_images: int = typer.Option(
        4, "--calibration-images", help="int8: how many training images calibrate the activations"
    ),
    pipeline: bool = typer.Option(
        False,
        "--pipeline",
        help="also build the whole-image graph pipeline.onnx (what the C library and "
        "--engine pipeline run): a second copy of every head, every tile in one run",
    ),
    pipeline_memory: Optional[float] = typer.Option(
        None,
        "--pipeline-memory",
        min=1,
        show_default="4096",
        help="--pipeline: MB the graph may take to build and check; a larger one is left out, the manifest says why",
    ),
) -> None:
    """Export graphs, indexes and manifest; prove parity with PyTorch; publish atomically."""
    from hiad_export.parity import ParityError
    from hiad_export.pipeline_memory import PIPELINE_MEMORY_MB
    from hiad_export.writer import ExportOptions, write_bundle
    from hiad_train.checkpoint import CheckpointError, checkpoint_ref, load_checkpoint

    try:
        model = load_checkpoint(checkpoint)
        meta = json.loads((checkpoint / "checkpoint.json").read_text())
        parity_images = _parity_images(list(images or []), meta.get("data"), model.tiling.image_size)
        calibration = (
            training_images(meta.get("data"), model.tiling.image_size, calibration_images)
            if precision is Precision.int8
            else []
        )
        opts = ExportOptions(
            {"index": index, "search_params": search},
            tolerance=tolerance,
            archive=archive,
            precision=precision,
            calibration=calibration,
            pipeline=pipeline,
            pipeline_memory_mb=pipeline_memory or PIPELINE_MEMORY_MB,
            checkpoint=checkpoint_ref(checkpoint),
        )
        manifest = write_bundle(model, out, parity_images, opts)
    except (CheckpointError, ParityError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    for note in opts.notes:
        typer.secho(note, fg=typer.colors.YELLOW)
    for path, r in manifest.parity.items():
        if isinstance(r, dict):
            status = (
                "ok"
                if r["passed"]
                else ("not enforced (approximate path: recorded)" if not r["enforced"] else "FAILED")
            )
            typer.echo(
                f"parity [{path}] on {r['images']} image(s): max map diff {r['max_abs_map_diff']:.3g} "
                f"({r['max_rel_map_diff']:.2e} of range), score diff {r['max_rel_score_diff']:.2e}: {status}"
            )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    typer.echo(
        f"bundle: {out} ({len(manifest.tasks)} task(s), {sum(f.bytes for f in manifest.files.values()) / 1e6:.1f} MB); "
        f"export peak RSS {peak_mb:.0f} MB"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
