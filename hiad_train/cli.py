"""`hiad-train CONFIG.yaml --data DIR --out DIR [--eval] [--ray ADDRESS]`, plus `hiad-train eval`, `eval-runtime`,
`calibrate`, `update` and `demo-data`."""

from __future__ import annotations

import datetime as dt
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from hiad_train.config import ConfigError, NormalizationMode, load_config
from hiad_train.data.elpv import ModuleType
from hiad_train.synthesis import SYNTHESIZERS
from hiad_train.tasks import GENERATORS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="hiad-deploy training stage (PyTorch).")
REGISTRIES = f"tasks.generator: {', '.join(GENERATORS)}; val_config.anomaly_syn_fn.name: {', '.join(SYNTHESIZERS)}"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _samples(data: Path, split: str):
    from hiad_train.data import read_jsonl, read_mvtec

    meta = data / f"{split}.jsonl"
    return read_jsonl(meta, data.parent) if meta.is_file() else read_mvtec(data, split)


def _evaluate(model, data: Path, out: Path) -> dict:
    from hiad_runtime.image import ImageError
    from hiad_runtime.overlay import overlay, save_rgb
    from hiad_train.evaluation import format_table
    from hiad_train.trainer import HRTrainer

    trainer = HRTrainer(model.config)
    samples = _samples(data, "test")
    t0 = time.perf_counter()
    try:
        metrics, preds = trainer.evaluate(model, samples)
    except ImageError as e:
        _fail(str(e))
    metrics["seconds_per_image_torch"] = (time.perf_counter() - t0) / len(samples)
    typer.echo(format_table(metrics))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if model.config.evaluation.overlays:
        vmax = float(max(m.max() for m in preds.maps))
        for s, m, g in zip(samples, preds.maps, preds.masks):
            save_rgb(
                out / "overlays" / f"{s.label_name}_{s.image_path.stem}.png",
                overlay(s.image(model.tiling.image_size), m, g, vmax=vmax),
            )
    return metrics


@app.command("train")
def train(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help=f"training YAML (see configs/); {REGISTRIES}"),
    data: Path = typer.Option(
        ...,
        "--data",
        exists=True,
        file_okay=False,
        help="class folder in MVTec-AD layout (train/, test/, ground_truth/) or with train.jsonl/test.jsonl",
    ),
    out: Path = typer.Option(Path("models/run"), "--out", help="run folder; the checkpoint goes to OUT/checkpoint"),
    eval_: bool = typer.Option(False, "--eval", help="evaluate on the test split afterwards"),
    ray_address: str | None = typer.Option(
        None,
        "--ray",
        help=(
            "train on Ray: 'local' (a Ray instance on this machine), 'auto' (the cluster this machine joined with "
            "`ray start`) or a cluster ADDRESS; needs the [ray] extra (docs/distributed.md)"
        ),
    ),
    ship_features: bool = typer.Option(
        False,
        "--ray-ship-features",
        help=(
            "with --ray: extract features here and ship them through Ray's object store (no storage shared by the "
            "nodes); by default workers read the images from their paths"
        ),
    ),
    device: Optional[str] = typer.Option(
        None,
        "--device",
        help=(
            "where training runs (overrides the config's `device:`): auto (default: CUDA when PyTorch sees a GPU), "
            "cpu, cuda, cuda:N, or GPU ids '0,1' (one worker process per GPU)"
        ),
    ),
    precision: Optional[str] = typer.Option(
        None,
        "--precision",
        help="fp32 or bf16 (autocast): the forward passes of epoch-trained detectors (overrides `patch.precision`)",
    ),
) -> None:
    """Train one detector per task and write the checkpoint (atomically)."""
    from hiad_runtime.cli import describe_threshold
    from hiad_runtime.image import ImageError
    from hiad_runtime.overlay import save_rgb
    from hiad_train.checkpoint import save_checkpoint
    from hiad_train.device import DeviceError, resolve_devices
    from hiad_train.executors import StageFailed, local_executor
    from hiad_train.tasks import print_tasks
    from hiad_train.trainer import HRTrainer
    from hiad_train.visualize import task_map

    try:
        cfg = load_config(config, _device_overrides(config, device, precision))
        devices = resolve_devices(cfg.device, "--device" if device is not None else "device")
    except (ConfigError, DeviceError) as e:  # before any image is read
        _fail(str(e))
    if ship_features and ray_address is None:
        _fail("--ray-ship-features needs --ray")
    samples = _samples(data, "train")
    executor, owns_ray = (
        (local_executor(devices), False) if ray_address is None else _ray_executor(ray_address, ship_features)
    )
    out.mkdir(parents=True, exist_ok=True)
    log = logging.FileHandler(out / "train.log", mode="w")
    log.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("hiad_train").addHandler(log)
    logging.getLogger("hiad_train").setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        model = HRTrainer(cfg, executor=executor).fit(samples)
    except (StageFailed, ImageError) as e:  # an image cut short or over the pixel budget, named
        _fail(f"{e}; no checkpoint written")
    finally:
        logging.getLogger("hiad_train").removeHandler(log)
        log.close()
        if owns_ray:
            import ray

            ray.shutdown()
    seconds = time.perf_counter() - t0
    typer.echo(
        print_tasks(model.tasks, model.tiling)
        if model.routing is None
        else f"{len(model.tasks)} retrieval tasks (routed at inference)"
    )
    held_out = model.validation["images"] if model.validation else 0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process (Ray workers have their own)
    typer.echo(
        f"trained {len(model.tasks)} task(s) on {len(samples) - held_out} images in {seconds:.1f} s, peak RSS "
        f"{peak_mb:.0f} MB"
    )
    if model.validation:
        v = {k: round(x, 4) if isinstance(x, float) else x for k, x in model.validation.items()}
        typer.echo(f"validation ({held_out} held-out image(s), synthetic anomalies): {v}")
        for kind in ("image", "pixel"):
            typer.echo(describe_threshold(kind, model.thresholds[kind], model.thresholds["rules"][kind], False))
    save_checkpoint(model, out / "checkpoint", data)
    save_rgb(out / "task_map.png", task_map(model.tasks, model.tiling, samples[0].image(model.tiling.image_size)))
    (out / "train.json").write_text(
        json.dumps(
            {
                "train_seconds": seconds,
                "train_images": len(samples),
                "ray": ray_address,
                "device": str(devices),
                "peak_rss_mb": round(peak_mb),
                "seconds": executor.seconds,
            },
            indent=1,
        )
    )
    typer.echo(f"checkpoint: {out / 'checkpoint'}")
    if eval_:
        _evaluate(model, data, out / "eval_torch")


def _device_overrides(config: Path, device: str | None, precision: str | None) -> dict:
    """`--device` and `--precision` as config overrides (`device`; `precision` in `patch` and `thumbnail`)."""
    overrides: dict = {}
    if device is not None:
        ids = [part.strip() for part in device.split(",")]
        overrides["device"] = [int(i) if i.isdigit() else i for i in ids] if len(ids) > 1 else device
    if precision is not None:
        cfg = load_config(config)
        if "precision" not in type(cfg.patch).model_fields:
            _fail(f"--precision: detector {cfg.detector!r} is not trained over epochs; precision has nothing to set")
        overrides["patch"] = {"precision": precision}
        if cfg.thumbnail is not None:
            overrides["thumbnail"] = {"precision": precision}
    return overrides


def _ray_executor(address: str, ship_features: bool):
    try:
        from hiad_runtime.ray_scoring import connect
        from hiad_train.distributed import RayExecutor
    except ImportError:
        _fail("--ray needs Ray: pip install 'hiad-deploy[ray]'")
    try:
        owns_ray = connect(address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        _fail(f"--ray {address}: cannot reach a Ray cluster ({e})")
    return RayExecutor(ship_features), owns_ray


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., exists=True, file_okay=False, help="checkpoint folder"),
    data: Path = typer.Option(..., "--data", exists=True, file_okay=False),
    out: Path = typer.Option(..., "--out"),
) -> None:
    """Evaluate a checkpoint with PyTorch inference: metrics table, metrics.json, overlays."""
    from hiad_train.checkpoint import load_checkpoint

    _evaluate(load_checkpoint(checkpoint), data, out)


@app.command("eval-runtime")
def eval_runtime(
    results: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="output folder of `hiad-runtime predict` (results.jsonl, maps/)"
    ),
    data: Path = typer.Option(
        ..., "--data", exists=True, file_okay=False, help="the dataset whose test split was predicted"
    ),
    resize: int = typer.Option(512, min=1, help="pixel metrics at this resolution"),
) -> None:
    """Evaluate the runtime's maps and scores against ground truth; print metrics and latency."""
    import numpy as np

    from hiad_train.evaluation import default_evaluators, evaluate, format_table

    lines = [json.loads(x) for x in (results / "results.jsonl").read_text().splitlines() if x.strip()]
    by_path = {Path(x["input"]).resolve(): x for x in lines if "error" not in x}
    scores, labels, maps, masks, latency = [], [], [], [], []
    for s in _samples(data, "test"):
        rec = by_path.get(s.image_path.resolve())
        if rec is None:
            _fail(f"{s.image_path} has no result in {results / 'results.jsonl'}")
        amap = np.load(results / rec["map"], allow_pickle=False)
        scores.append(rec["score"])
        labels.append(s.label)
        maps.append(amap)
        masks.append(s.mask((amap.shape[1], amap.shape[0])))
        latency.append(rec["latency_ms"])
    metrics = evaluate(np.asarray(scores), np.asarray(labels), maps, masks, default_evaluators(resize))
    metrics["runtime_latency_ms_median"] = float(np.median(latency))
    typer.echo(format_table(metrics))
    (results / "metrics.json").write_text(json.dumps(metrics, indent=1))


@app.command("calibrate")
def calibrate_cmd(
    source: Path = typer.Argument(..., exists=True, file_okay=False, help="checkpoint folder or bundle folder"),
    normal: Path = typer.Option(
        None, "--normal", exists=True, file_okay=False, help="normal (good) images from the line, searched recursively"
    ),
    defective: Path = typer.Option(
        None,
        "--defective",
        exists=True,
        file_okay=False,
        help="defective images: widen the normalization, misses reported",
    ),
    review: Path = typer.Option(
        None,
        "--review",
        exists=True,
        file_okay=False,
        help="a review store (hiad-runtime serve --review-dir): its images labeled good join --normal, defect "
        "--defective",
    ),
    out: Path = typer.Option(
        None, "--out", help="where the calibrated copy is published (default: SOURCE, as its new version)"
    ),
    rate: float = typer.Option(0.01, "--rate", min=1e-6, max=0.5, help="target false-alarm rate on normal images"),
    max_miss: Optional[float] = typer.Option(
        None,
        "--max-miss",
        min=0.0,
        max=0.99,
        help="instead of --rate: the highest thresholds missing at most this share of the --defective images",
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the synthetic anomalies and the bootstrap"),
    normalization: Optional[NormalizationMode] = typer.Option(
        None,
        "--normalization",
        help=(
            "global: one min-max for every task (keeps their relative scale); per_task: HiAD's (default: a "
            "checkpoint's own val_config, else global)"
        ),
    ),
) -> None:
    """Recompute thresholds (by false-alarm rate) and normalization from new images, without retraining.

    A checkpoint is re-published by hiad_train.calibration, a bundle by hiad_export.calibrate (this
    command composes the two; training modules never import export)."""
    from hiad_runtime.bundle import MANIFEST, BundleError
    from hiad_runtime.cli import describe_threshold
    from hiad_runtime.image import (
        ImageError,
        default_max_pixels,
        load_image,
        resize_image,
    )
    from hiad_train import calibration
    from hiad_train.operating_curve import describe_curve
    from hiad_train.synthesis import SynthesizerConfig

    try:
        if (source / "checkpoint.json").is_file():
            from hiad_train.checkpoint import CheckpointError, load_checkpoint

            try:
                model = load_checkpoint(source)
            except CheckpointError as e:
                _fail(str(e))
            scorer, write = calibration.model_scorer(model), calibration.write_checkpoint
            val = model.config.val_config
        elif (source / MANIFEST).is_file():
            from hiad_export.calibrate import publish_calibrated
            from hiad_runtime.inspector import Inspector

            scorer, write, val = calibration.bundle_scorer(Inspector.load(source)), publish_calibrated, None
        else:
            _fail(f"{source}: neither a checkpoint (checkpoint.json) nor a bundle ({MANIFEST})")
        size = scorer.tiling.image_size
        budget = default_max_pixels(size)
        files = {
            "normal": _files(normal) + _labeled(review, "good"),
            "defective": _files(defective) + _labeled(review, "defect"),
        }
        images = {name: [resize_image(load_image(f, budget), size) for f in found] for name, found in files.items()}
        if not images["normal"]:
            _fail(
                f"{' and '.join(str(d) for d in (normal, review) if d) or 'calibrate'}: no normal images found "
                "(give --normal DIR or --review STORE with images labeled good)"
            )
        synthesizer = (val.anomaly_syn_fn if val is not None else SynthesizerConfig()).build()
        mode = normalization or (val.normalization if val is not None else NormalizationMode.GLOBAL)
        cal = calibration.calibrate(
            scorer, images["normal"], images["defective"], synthesizer, rate, seed, mode, max_miss
        )
        target = out or source
        write(source.resolve(), target, cal)
    except (BundleError, ImageError, OSError, ValueError) as e:
        _fail(str(e))
    for kind, curve in cal.curves.items():
        typer.echo(describe_curve(kind, curve))
    for kind in ("image", "pixel"):
        rule = cal.thresholds["rules"][kind]
        missed = (
            f"; misses {rule['missed']} of {rule['defective_images']} defective image(s)" if "missed" in rule else ""
        )
        typer.echo(
            describe_threshold(kind, cal.thresholds[kind], rule, False) + f"; flags {rule['flagged']} of them{missed}"
        )
    typer.echo(f"calibrated: {target}")


def _files(folder: Path | None) -> list[Path]:
    """The image files under `folder`, searched recursively (none without a folder)."""
    from hiad_runtime.results import find_inputs

    return find_inputs([folder]) if folder else []


def _labeled(store: Path | None, label: str) -> list[Path]:
    """The images of the review store at `store` whose latest label is `label` (none without a store)."""
    from hiad_runtime.review.store import ReviewStore

    return ReviewStore(store).labeled(label) if store else []


def _normal_files(path: Path) -> tuple[list[Path], str]:
    """`update --normal`: a review store's images labeled good, else the image files under the folder; and
    what the lineage says they were."""
    from hiad_runtime.review.store import ReviewStore, ReviewStoreError

    try:
        return ReviewStore(path).labeled("good"), f"{path.absolute()} (review store: labeled good)"
    except ReviewStoreError:
        return _files(path), str(path.absolute())


def _update_targets(source: Path, out: Path | None, checkpoint: Path | None):
    """`update`'s parent bundle (a bundle SOURCE, else the one published at OUT, else None) and its id, the
    checkpoint, and OUT."""
    from hiad_runtime.bundle import MANIFEST, Bundle, bundle_id
    from hiad_train.checkpoint import checkpoint_ref

    if (source / "checkpoint.json").is_file():
        if checkpoint is not None:
            _fail("--checkpoint goes with a bundle SOURCE; SOURCE is a checkpoint already")
        if out is None:
            _fail("--out BUNDLE is needed with a checkpoint SOURCE: the bundle to publish the update as")
        parent = Bundle.load(out) if (out / MANIFEST).exists() else None
        ckpt = source
    elif (source / MANIFEST).is_file():
        parent, out, ckpt = Bundle.load(source), out or source, checkpoint
    else:
        _fail(f"{source}: neither a checkpoint (checkpoint.json) nor a bundle ({MANIFEST})")
    if ckpt is None:
        recorded = parent.manifest.checkpoint
        if recorded is None:
            _fail(f"{source}: the bundle records no checkpoint (exported before #23): give --checkpoint DIR")
        ckpt = Path(recorded.path)
        if not (ckpt / "checkpoint.json").is_file() or checkpoint_ref(ckpt).sha256 != recorded.sha256:
            _fail(
                f"{source}: the checkpoint it was exported from, {ckpt}, is missing or has changed since "
                "(checkpoint.json sha256 differs): give --checkpoint DIR to name the one to update"
            )
    parent_id = None if parent is None else bundle_id((parent.root / MANIFEST).read_bytes())
    return None if parent is None else parent.manifest, parent_id, ckpt, out


@app.command("update")
def update_cmd(
    source: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="checkpoint folder, or bundle folder exported from one"
    ),
    normal: Path = typer.Option(
        ...,
        "--normal",
        exists=True,
        file_okay=False,
        help="new normal images: a folder (searched recursively) or a review store (its images labeled good)",
    ),
    out: Path = typer.Option(
        None, "--out", help="the bundle published as its new version (default: SOURCE when it is a bundle)"
    ),
    checkpoint: Path = typer.Option(
        None,
        "--checkpoint",
        exists=True,
        file_okay=False,
        help="with a bundle SOURCE: its checkpoint (default: the one its manifest records)",
    ),
    images: Optional[List[Path]] = typer.Option(
        None,
        "--images",
        help="images for the parity check (default: as hiad-export, per class a test image of the training data, "
        "but none of the new ones; else the new normal images)",
    ),
) -> None:
    """Add normal images to a memory-based model (PatchCore's bank, PaDiM's Gaussians) without retraining.

    The checkpoint is re-published with them as its new version, then exported as the new version of the
    bundle (parity checked, published atomically; `POST /v1/reload` serves it), its manifest's `lineage`
    saying from which bundle, how many images and when. Normalization and thresholds stay the parent
    bundle's: `hiad-train calibrate` recomputes them. Detectors that learn by training are refused."""
    from hiad_export.cli import held_back_images
    from hiad_export.parity import ParityError  # the command publishes a bundle: export's, composed here
    from hiad_export.update import publish_update
    from hiad_runtime.bundle import BundleError, LineageStep
    from hiad_runtime.image import ImageError, default_max_pixels, load_image, resize_image
    from hiad_train.checkpoint import CheckpointError, checkpoint_ref, load_checkpoint, save_checkpoint
    from hiad_train.update import NeedsRetraining, adopt_decision_rule, check_updatable, update_model

    try:
        parent, parent_id, ckpt, out = _update_targets(source, out, checkpoint)
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        check_updatable(meta["detector"])  # before any work
        files, origin = _normal_files(normal)
        if not files:
            _fail(f"{normal}: no normal images found")
        model = load_checkpoint(ckpt)
        size = model.tiling.image_size
        budget = default_max_pixels(size)
        added = [resize_image(load_image(f, budget), size) for f in files]
        held_back = held_back_images(list(images or []), meta.get("data"), files)
        parity = [resize_image(load_image(f, budget), size) for f in held_back] or added[:4]
        update_model(model, added)
        if parent is not None:
            adopt_decision_rule(model, parent)
        save_checkpoint(model, ckpt, meta.get("data"))
        typer.echo(f"checkpoint: {ckpt} (new version, {len(added)} normal image(s) added)")
        step = LineageStep(
            parent=parent_id,
            images_added=len(added),
            images=origin,
            date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
    except (NeedsRetraining, CheckpointError, BundleError, ImageError, OSError, ValueError) as e:
        _fail(str(e))
    try:
        manifest, opts = publish_update(model, out, parity, checkpoint_ref(ckpt), step, parent, meta.get("data"))
    except (BundleError, ParityError, OSError, ValueError) as e:
        _fail(f"{e}; {out} is left as it was, {ckpt} holds the update: hiad-export it (--images HELD_BACK)")
    for note in opts.notes:
        typer.echo(note)
    for path, r in manifest.parity.items():
        if isinstance(r, dict):
            typer.echo(
                f"parity [{path}] on {r['images']} image(s): {r['max_rel_map_diff']:.2e} of the map's range: "
                f"{'ok' if r['passed'] else 'not enforced' if not r['enforced'] else 'FAILED'}"
            )
    typer.echo(f"{len(manifest.tasks)} task(s) updated, e.g. {manifest.tasks[0].name}: {manifest.tasks[0].training}")
    typer.echo(
        f"bundle: {out} (+{step.images_added} normal image(s), parent {step.parent}); "
        "normalization and thresholds are the parent's (hiad-train calibrate recomputes them)"
    )


@app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(Path("data"), help="parent folder; the dataset goes to OUT/elpv"),
    rows: int = typer.Option(4, min=1),
    cols: int = typer.Option(4, min=1),
    cell_size: int = typer.Option(512, min=8, help="pixels per cell side (image = cols*cell x rows*cell)"),
    n_train: int = typer.Option(10, min=1),
    n_test: int = typer.Option(10, min=2, help="test modules (half of them defective)"),
    module_type: ModuleType = typer.Option(ModuleType.MONO, help="ELPV cell type"),
    seed: int = typer.Option(0, min=0),
) -> None:
    """Build the ELPV demo: real EL solar-cell images composed into module images (CC BY-NC-SA 4.0)."""
    from hiad_train.data.elpv import build_elpv_demo

    try:
        root = build_elpv_demo(out, rows, cols, cell_size, n_train, n_test, module_type, seed)
    except ValueError as e:
        _fail(str(e))
    typer.echo(
        f"demo dataset: {root} ({n_train} train, {n_test} test modules of {rows}x{cols} cells, "
        f"{cols * cell_size}x{rows * cell_size} px)"
    )


def main() -> None:
    """`hiad-train CONFIG ...` is shorthand for `hiad-train train CONFIG ...`."""
    if len(sys.argv) > 1 and sys.argv[1] not in {
        "train",
        "eval",
        "eval-runtime",
        "calibrate",
        "update",
        "demo-data",
        "--help",
        "-h",
    }:
        sys.argv.insert(1, "train")
    app()


if __name__ == "__main__":
    main()
