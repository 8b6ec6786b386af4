"""`hiad-runtime predict BUNDLE IMAGE_OR_DIR... --out DIR`, `bench BUNDLE [IMAGES] --repeat N`, `verify BUNDLE`,
`serve BUNDLE`."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, List, NoReturn, Optional

import numpy as np
import typer

from hiad_runtime.backends import Backend
from hiad_runtime.bundle import MANIFEST, Bundle, BundleError
from hiad_runtime.cores import CORES
from hiad_runtime.engines.base import EngineKind
from hiad_runtime.files import sha256_file
from hiad_runtime.heads import HeadPath
from hiad_runtime.image import ImageError
from hiad_runtime.options import RuntimeOptions
from hiad_runtime.results import InputError, OutputError, ResultsFolder, find_inputs, output_keys

app = typer.Typer(add_completion=False, no_args_is_help=True, help="hiad-deploy inspection runtime (torch-free).")

# The runtime options, declared once; predict, bench and serve each take them and build one RuntimeOptions.
BackendOption = Annotated[
    Backend,
    typer.Option(
        "--backend",
        help="auto: onnxruntime on CUDA where its CUDA provider is offered ('hiad-deploy[gpu]'); on a "
        "CPU-only box openvino where it is installed (faster here at the same parity), else onnxruntime; or name one",
    ),
]
HeadPathOption = Annotated[
    HeadPath,
    typer.Option(
        "--head-path",
        help="native: a head kind's fast path (faiss for k-NN) where it has one; "
        "onnx: every head's exported graph; auto: onnx on a GPU (features stay on the device), else native",
    ),
]
EngineOption = Annotated[
    EngineKind,
    typer.Option(
        "--engine", help="tiles: stage by stage; pipeline: the bundle's whole-image graph (what the C library runs)"
    ),
]
BatchOption = Annotated[
    Optional[int],
    typer.Option(
        "--batch",
        min=1,
        help="tiles per embedder call (default: 1 on a CPU, fastest and smallest ONNX Runtime arena "
        "at 512 px tiles; --stream-tiles on a GPU)",
    ),
]
StreamTilesOption = Annotated[
    int,
    typer.Option(
        "--stream-tiles",
        min=1,
        help="tiles embedded and scored per chunk: bounds memory on large images (map built in place)",
    ),
]
HeadMemoryOption = Annotated[
    Optional[float],
    typer.Option(
        "--head-memory",
        help="MB of task heads (their files) kept loaded (default: a quarter of the memory available "
        "at start, at least 256); a bundle with more loads each chunk's heads as it goes, and says so once",
    ),
]
ThreadsOption = Annotated[int, typer.Option("--threads", min=0, help="ONNX Runtime intra-op threads (0 = all cores)")]
PREFETCH_HELP = "images decoded ahead on a worker thread while the current one is inferred (0 = none)"


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _options(**fields) -> RuntimeOptions:
    try:
        return RuntimeOptions(**fields)
    except ValueError as e:
        _fail(str(e))


def _load(bundle: Path, options: RuntimeOptions):
    from hiad_runtime.inspector import Inspector

    try:
        return Inspector.load(bundle, options)
    except (BundleError, ValueError) as e:
        _fail(str(e))


def describe_threshold(kind: str, value: float | None, rule: dict | None, override: bool) -> str:
    """One line saying what a threshold is and how it was set (the bundle's record of its rule)."""
    if value is None:
        effect, option = ("no decisions", "threshold") if kind == "image" else ("no masks", "pixel-threshold")
        return f"{kind} threshold: none ({effect}; --{option} sets one)"
    head = f"{kind} threshold {value:.4g}"
    if override:
        return f"{head}: given on the command line"
    rule = rule or {}
    when = f", calibrated {rule['calibrated']}" if "calibrated" in rule else ""
    if rule.get("rule") == "false_alarm_rate":
        low, high = rule["rate_interval_90"]
        warning = f"; warning: {rule['warning']}" if "warning" in rule else ""
        return (
            f"{head}: false-alarm rate {rule['rate']:.2%} on {rule['images']} normal image(s) ({rule['tiles']} tiles"
            f"{when}), achieved rate {low:.2%}-{high:.2%} (90% interval){warning}"
        )
    if rule.get("rule") == "max_miss":
        low, high = rule["false_alarm_interval_90"]
        return (
            f"{head}: misses at most {rule['max_miss']:.0%} of {rule['defective_images']} defective image(s){when}; "
            f"false-alarm rate {low:.1%}-{high:.1%} on {rule['images']} normal image(s) (90% interval)"
        )
    if rule.get("rule") == "f1":
        return (
            f"{head}: best F1 on {rule['tiles']} validation tiles with synthetic anomalies "
            f"({rule['images']} image(s){when})"
        )
    return f"{head}: rule not recorded in this bundle"


@app.command()
def predict(
    bundle: Path = typer.Argument(..., exists=True, help="bundle folder or .tar"),
    inputs: List[Path] = typer.Argument(
        ...,
        help="image files, folders (searched recursively), quoted glob patterns "
        "('data/**/*.png') and/or .txt files listing them, one per line",
    ),
    out: Path = typer.Option(
        ..., "--out", help="results.jsonl, maps/ and overlays/ go here (locked while the run writes)"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an earlier run's results in --out (refused otherwise)"
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="continue an earlier run in --out (killed or not): score "
        "only the inputs it has not recorded; same bundle and options assumed",
    ),
    overlays: bool = typer.Option(False, "--overlays", help="also write anomaly-map overlay PNGs"),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="image-score threshold (overrides the bundle's)"
    ),
    pixel_threshold: Optional[float] = typer.Option(
        None, "--pixel-threshold", help="pixel threshold (overrides the bundle's)"
    ),
    head_path: HeadPathOption = HeadPath.auto,
    engine: EngineOption = EngineKind.tiles,
    threads: int = typer.Option(
        0,
        "--threads",
        min=0,
        help="ONNX Runtime intra-op threads (0 = all cores); with "
        "--ray, per actor, which reserves as many CPUs (0 = 1)",
    ),
    batch: BatchOption = None,
    input_size: bool = typer.Option(
        False, "--input-size", help="write maps at each input's own size instead of the bundle's image_size"
    ),
    max_pixels: Optional[int] = typer.Option(
        None, "--max-pixels", min=1, help="refuse inputs declaring more pixels (default: 4x the bundle's image area)"
    ),
    backend: BackendOption = Backend.auto,
    stream_tiles: StreamTilesOption = 16,
    head_memory: HeadMemoryOption = None,
    prefetch: int = typer.Option(0, "--prefetch", min=0, help=PREFETCH_HELP + " (not with --ray)"),
    ray: Optional[str] = typer.Option(
        None,
        "--ray",
        help="score on Ray actors (extra [ray]): 'local' (a Ray instance "
        "here), 'auto' (the cluster this node is in) or HEAD:6379; the bundle and inputs "
        "at the same paths on every node (docs/distributed.md)",
    ),
    actors: int = typer.Option(
        0,
        "--actors",
        min=0,
        help="with --ray: actors, each loading the bundle once (0 = the cluster's CPUs / --threads)",
    ),
) -> None:
    """Score images; one JSON line per image (written as soon as it is done, in input order), a float32 map each."""
    from hiad_runtime.batch import Input, OutputSettings, write_all

    options = _options(
        backend=backend,
        head_path=head_path,
        engine=engine,
        batch_size=batch,
        stream_tiles=stream_tiles,
        head_memory=head_memory,
        threads=threads or (1 if ray else 0),
        max_pixels=max_pixels,
        image_threshold=threshold,
        pixel_threshold=pixel_threshold,
    )
    if ray and prefetch:
        raise typer.BadParameter(
            "decoding ahead is the local command's: each actor has its next input queued", param_hint="--prefetch"
        )
    try:
        files = find_inputs(inputs)
    except InputError as e:
        _fail(str(e))
    if not files:
        _fail("no images found in the inputs")
    items = [Input(str(f), key) for f, key in zip(files, output_keys(files))]
    settings = OutputSettings(input_size=input_size, overlays=overlays)
    scorers = _on_ray(ray, actors, bundle, options, settings) if ray else _here(bundle, options, settings, prefetch)
    with scorers as (score, about):
        rules = about["rules"]
        for kind, given in (("image", threshold), ("pixel", pixel_threshold)):
            typer.echo(describe_threshold(kind, about[f"{kind}_threshold"], rules.get(kind), given is not None))
        try:
            with ResultsFolder(out, overwrite, resume) as folder:
                todo = [item for item in items if item.path not in folder.recorded]
                if resume:
                    typer.echo(f"resuming: {len(items) - len(todo)} of {len(items)} input(s) already recorded")
                typer.echo(f"writing {folder.results_path} (holding {folder.lock_path} until done)")
                t_start = time.perf_counter()
                failures = write_all(folder, score(todo), len(todo))
                rate = len(todo) / (time.perf_counter() - t_start)
        except OutputError as e:
            _fail(str(e))
    typer.echo(
        f"{rate:.3g} images/s; embedder precision {about['precision']}; backend {about['backend']}; "
        f"providers: {', '.join(about['providers'])}; results: {out / 'results.jsonl'}"
    )
    if failures:
        raise typer.Exit(1)


@contextmanager
def _here(bundle: Path, options: RuntimeOptions, settings, prefetch: int):
    """`predict`'s scorer in this process: (score(inputs) -> outcomes in order, the run's description)."""
    from hiad_runtime.batch import describe, score_locally

    inspector = _load(bundle, options)
    yield (lambda todo: score_locally(inspector, todo, settings, prefetch)), describe(inspector)


@contextmanager
def _on_ray(address: str, actors: int, bundle: Path, options: RuntimeOptions, settings):
    """`predict --ray`'s scorer: actors on the cluster; a failure keeps the records so far (--resume)."""
    try:
        import ray

        from hiad_runtime.ray_scoring import RayScorers, ScoringFailed, capacity, connect
    except ImportError as e:
        _fail(f"{e.name} is missing; install the ray extra: pip install 'hiad-deploy[ray]'")
    try:
        owns_ray = connect(address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        _fail(f"--ray {address}: cannot reach a Ray cluster ({e})")
    pool = None
    try:
        room = capacity(options.threads)
        if room == 0:
            _fail(f"--threads {options.threads}: no node of this Ray cluster has that many CPUs")
        count = actors or room
        pool = RayScorers(bundle, options, settings, count)
        try:
            about = pool.describe()
        except ScoringFailed as e:
            _fail(str(e))
        typer.echo(
            f"{count} Ray actor(s) of {options.threads} thread(s) each (the cluster holds {room} at once); "
            f"first started on node {about['node']}"
        )
        yield pool.score, about
    except ScoringFailed as e:
        _fail(f"{e}; the records written are kept: --resume continues")
    finally:
        if pool is not None:
            pool.close()
        if owns_ray:
            ray.shutdown()


@app.command()
def verify(bundle: Path = typer.Argument(..., exists=True, help="bundle folder or .tar")) -> None:
    """Fully check a bundle: paths confined, every sha256, manifest and geometry, every graph and index loads.

    Exit code 0 when it can be used as it is, 2 otherwise. The manifest's own sha256 is printed: it pins
    every file, so a signature over manifest.json (ssh-keygen -Y sign, minisign) signs the whole bundle.
    """
    from hiad_runtime.inspector import Inspector

    try:
        b = Bundle.load(bundle, verify=True)
        inspector = Inspector(b)
    except BundleError as e:
        _fail(f"bundle NOT usable: {e}")
    m = b.manifest
    typer.echo(f"bundle {b.root}: OK")
    typer.echo(f"  {m.schema} v{m.schema_version}, {m.producer}, created {m.created}, detector {m.detector}")
    typer.echo(f"  {len(m.files)} files, {sum(f.bytes for f in m.files.values()) / 1e6:.1f} MB, every sha256 matches")
    typer.echo(
        f"  image_size {'x'.join(map(str, inspector.tiling.image_size))}, {len(inspector.tiling.tiles)} tiles, "
        f"{len(m.tasks)} task(s)"
    )
    for path, r in (m.parity or {}).items():
        if isinstance(r, dict):
            typer.echo(
                f"  parity [{path}]: "
                f"{'passed' if r['passed'] else 'FAILED'}{'' if r['enforced'] else ' (not enforced)'}"
            )
    for step in m.lineage:
        typer.echo(
            f"  updated {step.date}: +{step.images_added} normal image(s) from {step.images} (parent {step.parent})"
        )
    typer.echo(f"  manifest sha256 {sha256_file(b.root / MANIFEST)} (sign manifest.json to sign the bundle)")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _floor_ms(floors: list) -> dict | None:
    """Medians (ms) of the floor runs: backbone alone, and with the exact search (None without banks)."""
    if not floors:
        return None
    searched = None if floors[0].exact_search is None else [f.backbone + f.exact_search for f in floors]
    return {
        "backbone": float(np.median([f.backbone for f in floors]) * 1000),
        "backbone_exact_search": None if searched is None else float(np.median(searched) * 1000),
        "backbone_cpu": float(np.median([f.backbone_cpu for f in floors]) * 1000),
    }


def _floor_line(figures: dict) -> str:
    """The floor and each figure's ratio to it."""
    floor, total = figures["floor_ms"], figures["stages_ms"]["total"]["median"]
    line = (
        f"floor: backbone alone {floor['backbone']:.1f} ms (total {total / floor['backbone']:.2f}x; "
        f"images/s x backbone {figures['images_per_s'] * floor['backbone'] / 1000:.2f})"
    )
    if floor["backbone_exact_search"] is not None:
        exact = floor["backbone_exact_search"]
        line += f"; backbone + exact k-NN search {exact:.1f} ms (total {total / exact:.2f}x)"
    cores, cpu = figures["cores"], figures["cpu_ms_per_image"]
    return line + (
        f"\nCPU per image {cpu:.0f} ms, the backbone's {floor['backbone_cpu']:.0f} ms "
        f"({floor['backbone_cpu'] / floor['backbone']:.1f} of {cores} cores busy): {cores} cores give at most "
        f"{cores * floor['backbone'] / cpu:.2f} images/s x backbone"
    )


@app.command()
def bench(
    bundle: Path = typer.Argument(..., exists=True, help="bundle folder or .tar"),
    images: Optional[List[Path]] = typer.Argument(
        None, help="images to run (default: one synthetic image at the bundle's size)"
    ),
    repeat: int = typer.Option(10, "--repeat", min=1),
    warmup: int = typer.Option(1, "--warmup", min=0),
    head_path: HeadPathOption = HeadPath.auto,
    engine: EngineOption = EngineKind.tiles,
    threads: ThreadsOption = 0,
    batch: BatchOption = None,
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON"),
    backend: BackendOption = Backend.auto,
    stream_tiles: StreamTilesOption = 16,
    head_memory: HeadMemoryOption = None,
    prefetch: int = typer.Option(
        0,
        "--prefetch",
        min=0,
        help="with IMAGES, each run decodes its image from the file: "
        "inline (0) or N images ahead on a worker thread (throughput mode)",
    ),
) -> None:
    """Per-stage latency (median, p95), images/s and peak RSS, and the floor they are measured against
    (the embedder alone on the same tiles, plus an exact k-NN search of the same banks), measured right
    after each timed run on its image, so a drifting load moves both alike. A benchmark that prints figures."""
    from hiad_runtime.engines.tiles import TileEngine
    from hiad_runtime.floor import measure_floor
    from hiad_runtime.image import resize_image
    from hiad_runtime.prefetch import prefetched

    inspector = _load(
        bundle,
        _options(
            backend=backend,
            head_path=head_path,
            engine=engine,
            batch_size=batch,
            stream_tiles=stream_tiles,
            head_memory=head_memory,
            threads=threads,
        ),
    )
    stages = inspector.stages
    size = inspector.tiling.image_size
    if images:
        paths = find_inputs(images)
        load = lambda i: inspector.decode(paths[i % len(paths)])  # noqa: E731
    else:
        if prefetch:
            raise typer.BadParameter("--prefetch decodes files: give IMAGES", param_hint="--prefetch")
        frame = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        load = lambda i: frame  # noqa: E731
    per_stage = {s: [] for s in (*stages, "total")}
    floors, floor_wall, floor_cpu, floor_loads = [], 0.0, 0.0, 0  # the floor, after each timed run (not in images/s)
    source = prefetched(range(warmup + repeat), load, prefetch)
    heads = inspector.engine.heads  # None where the engine loads no heads one by one (the whole-image graph)
    for i in range(warmup + repeat):
        if i == warmup:
            t_start, cpu_start = time.perf_counter(), time.process_time()
            loads_before = heads.loads if heads else 0
        t0 = time.perf_counter()
        try:
            image = next(source)[1].result()
        except ImageError as e:
            _fail(str(e))
        waited = time.perf_counter() - t0  # decoding the file inline, or waiting for the prefetching thread
        r = inspector.predict(image)
        if i >= warmup:
            per_stage["total"].append(time.perf_counter() - t0)
            for s in stages:
                per_stage[s].append(r.timings.get(s, 0.0) + (waited if s == "decode" else 0.0))
        if i >= warmup and isinstance(inspector.engine, TileEngine):  # the whole-image graph has no stages apart
            t0, c0, loads = time.perf_counter(), time.process_time(), heads.loads if heads else 0
            floors.append(measure_floor(inspector.engine, resize_image(image, size)))
            floor_wall += time.perf_counter() - t0
            floor_cpu += time.process_time() - c0
            floor_loads += (heads.loads if heads else 0) - loads  # its searches read paged heads too: not counted
        del image, r  # large images: the next run must not meet this one's image and map still alive
    wall = time.perf_counter() - t_start - floor_wall
    cpu = time.process_time() - cpu_start - floor_cpu  # all threads, decoding ahead included
    figures = {
        "bundle": str(bundle),
        "image_size": list(size),
        "tiles": len(inspector.tiling.tiles),
        "tasks": len(inspector.manifest.tasks),
        "head_path": inspector.options.head_path.value,  # as resolved for the device
        "engine": engine.value,
        "backend": inspector.sessions.backend,
        "precision": inspector.precision,
        "stream_tiles": stream_tiles,
        "batch": inspector.options.batch_size,
        "head_memory_mb": inspector.engine.head_memory if heads else None,
        "head_loads": heads.loads if heads else None,  # heads read from the bundle, preload included
        # the timed runs' (0: all resident)
        "head_loads_per_image": (heads.loads - loads_before - floor_loads) / repeat if heads else None,
        "prefetch": prefetch,
        "providers": inspector.providers_in_use,
        "repeat": repeat,
        "stages_ms": {
            s: {"median": float(np.median(v) * 1000), "p95": float(np.percentile(v, 95) * 1000)}
            for s, v in per_stage.items()
        },
        "images_per_s": repeat / wall,
        "cpu_ms_per_image": cpu / repeat * 1000,
        "cores": CORES,
        "peak_rss_mb": _peak_rss_mb(),
        "floor_ms": _floor_ms(floors),
    }
    typer.echo(
        f"{figures['tiles']} tiles, {figures['tasks']} tasks, engine {engine.value}, head path {figures['head_path']}, "
        f"backend {inspector.sessions.backend}, embedder precision {inspector.precision}, "
        f"providers={','.join(figures['providers'])}, "
        f"{repeat} runs" + (f", {prefetch} image(s) decoded ahead" if prefetch else "")
    )
    typer.echo(f"{'stage':<9} {'median ms':>10} {'p95 ms':>10}")
    for s, v in figures["stages_ms"].items():
        typer.echo(f"{s:<9} {v['median']:>10.1f} {v['p95']:>10.1f}")
    if heads:
        typer.echo(
            f"head loads per image {figures['head_loads_per_image']:.1f} ({len(heads.sizes)} heads, "
            f"{sum(heads.sizes.values()) / 2**20:.0f} MB of files; "
            f"head memory {inspector.engine.head_memory:.0f} MB)"
        )
    typer.echo(f"images/s {figures['images_per_s']:.2f}; peak RSS {figures['peak_rss_mb']:.0f} MB")
    if floors:
        typer.echo(_floor_line(figures))
    if json_out:
        json_out.write_text(json.dumps(figures, indent=1))


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="bundle folder or .tar"),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="address to bind (0.0.0.0 exposes the service to the network)"
    ),
    port: int = typer.Option(8080, "--port"),
    workers: int = typer.Option(1, "--workers", help="inferences run at once"),
    max_queue: int = typer.Option(8, "--max-queue", help="requests that may wait for a worker; more are answered 503"),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="largest request body"),
    max_inflight_mb: float = typer.Option(256.0, "--max-inflight-mb", help="request bodies held at once; more: 503"),
    max_megapixels: Optional[float] = typer.Option(
        None,
        "--max-megapixels",
        help="largest declared image size, checked before decoding (default: predict's, 4x the bundle's image area)",
    ),
    timeout: float = typer.Option(
        30.0, "--timeout", help="seconds for an answer once the body is in, queue wait included"
    ),
    header_timeout: float = typer.Option(
        10.0, "--header-timeout", help="seconds a client has to send a request's headers"
    ),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="seconds a client has to send a request's body"),
    max_connections: Optional[int] = typer.Option(
        None,
        "--max-connections",
        help="connections open at once; more are answered 503 (default: 1024, at most 3/4 of the open-file limit)",
    ),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", help="file holding the bearer token /v1/* requires"
    ),
    threads: int = typer.Option(
        0,
        "--threads",
        min=0,
        help="ONNX Runtime intra-op threads per inference (0 = cores / workers; 1 with --ray-replicas)",
    ),
    ray_replicas: Optional[int] = typer.Option(
        None,
        "--ray-replicas",
        min=1,
        help="serve as N Ray Serve replicas behind Ray's HTTP proxy, each with these limits and reserving "
        "workers x threads CPUs (needs the `ray` extra; docs/distributed.md)",
    ),
    max_replicas: Optional[int] = typer.Option(
        None, "--max-replicas", min=1, help="with --ray-replicas: autoscale between N and this many replicas"
    ),
    ray_address: str = typer.Option(
        "local", "--ray", help="with --ray-replicas: 'local' (a Ray instance here), 'auto' or a cluster address"
    ),
    head_path: HeadPathOption = HeadPath.auto,
    engine: EngineOption = EngineKind.tiles,
    batch: BatchOption = None,
    backend: BackendOption = Backend.auto,
    stream_tiles: StreamTilesOption = 16,
    head_memory: HeadMemoryOption = None,
    review_dir: Optional[Path] = typer.Option(
        None,
        "--review-dir",
        help="keep every inspection (image, result, map) and its labels here, and serve the review page at /",
    ),
    keep: Optional[int] = typer.Option(
        None, "--keep", min=1, help="with --review-dir: inspections kept at most (oldest removed first)"
    ),
    keep_gb: Optional[float] = typer.Option(
        None, "--keep-gb", min=0.001, help="with --review-dir: GB of inspections kept at most (oldest removed first)"
    ),
    review_pass_sample: float = typer.Option(
        1.0, "--review-pass-sample", min=0.0, max=1.0, help="with --review-dir: share of passes kept (flags: all)"
    ),
    review_queue: int = typer.Option(
        16, "--review-queue", min=1, help="inspections waiting to be written; more are not kept (counted in /metrics)"
    ),
    drift_window: int = typer.Option(
        500, "--drift-window", min=30, help="recent scores compared with the bundle's normal-score law (drift)"
    ),
) -> None:
    """Serve the bundle over HTTP (POST /v1/inspect); needs the `serve` extra (and `ray` for --ray-replicas)."""
    import os

    if (keep is not None or keep_gb is not None) and review_dir is None:
        _fail("--keep and --keep-gb bound the review store: give --review-dir too")
    if review_dir is not None and ray_replicas is not None:
        _fail("--review-dir keeps one process's inspections: not with --ray-replicas (one store per replica)")
    try:
        from hiad_runtime.review.keeper import ReviewSettings
        from hiad_runtime.serve.app import ServeSettings
        from hiad_runtime.serve.server import run
    except ImportError as e:
        typer.secho(
            f"error: {e.name} is missing; install the serve extra: pip install 'hiad-deploy[serve]'",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2) from None
    token = None
    if token_file is not None:
        token = token_file.read_text().strip() if token_file.is_file() else ""
        if not token:
            typer.secho(f"error: {token_file}: no token in this file", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
    runtime = _options(
        backend=backend,
        head_path=head_path,
        engine=engine,
        batch_size=batch,
        stream_tiles=stream_tiles,
        head_memory=head_memory,
        threads=threads or (1 if ray_replicas else max(1, (os.cpu_count() or 1) // max(workers, 1))),
        max_pixels=None if max_megapixels is None else int(max_megapixels * 1e6),
    )
    try:
        settings = ServeSettings(
            bundle=bundle.expanduser().absolute() if ray_replicas else bundle,  # replicas start elsewhere
            runtime=runtime,
            workers=workers,
            max_queue=max_queue,
            max_body_bytes=int(max_body_mb * (1 << 20)),
            max_inflight_bytes=int(max_inflight_mb * (1 << 20)),
            timeout_s=timeout,
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            max_connections=max_connections,
            token=token,
            review=None
            if review_dir is None
            else ReviewSettings(
                str(review_dir),
                keep=keep,
                keep_bytes=None if keep_gb is None else int(keep_gb * 1e9),
                pass_sample=review_pass_sample,
                queue=review_queue,
            ),
            drift_window=drift_window,
        )
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if ray_replicas is None:
        raise typer.Exit(run(settings, host, port))
    raise typer.Exit(_serve_on_ray(settings, ray_replicas, max_replicas, ray_address, host, port))


def _serve_on_ray(settings, replicas: int, max_replicas: int | None, address: str, host: str, port: int) -> int:
    """`serve --ray-replicas`: the same service as a Ray Serve deployment (hiad_runtime/serve/replicas.py)."""
    try:
        import ray.serve  # noqa: F401  (Ray Serve's own dependencies come with the extra)

        from hiad_runtime.serve import replicas as on_ray

        scale = on_ray.ReplicaScale(
            replicas, max_replicas or replicas, settings.workers * settings.runtime.threads, address
        )
    except ImportError as e:
        typer.secho(
            f"error: {e.name} is missing; install the ray extra: pip install 'hiad-deploy[ray]'", fg="red", err=True
        )
        return 2
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        return 2
    return on_ray.run(settings, scale, host, port)


def main() -> None:
    """Console entry point `hiad-runtime`."""
    app()


if __name__ == "__main__":
    main()
