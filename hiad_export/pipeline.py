"""The whole-image pipeline as one ONNX graph: uint8 image -> anomaly map, score (decision, mask).

Everything the Python runtime does after decoding and resizing is composed here from the bundle's own
parts (embedders and the detectors' heads), so a C caller runs one `session.run` per image:
tile crops -> context windows (integer downscales as exact uint8 area averages) -> embedder -> fusion
-> routing (argmin over the centres; every task's head scores every tile, the routed one is kept) or
static tasks (each head on its own tiles) -> per-task normalization -> bilinear upsampling and overlap
averaging -> thumbnail branch and max -> Gaussian blur (symmetric 'reflect' borders) -> block-mean
image score -> thresholds. Thresholds, the schema version and the bundle's identity are the
graph's metadata. What cannot be expressed exactly raises `PipelineUnsupported` naming it.

The graph is built only when asked for (`hiad-export --pipeline`) and within a memory budget: it
holds a second copy of every head (PaDiM at 2048^2: 2.6 GB on disk) and runs every tile at once
(hiad_export/pipeline_memory.py). Otherwise `manifest.pipeline.unsupported` says why, with its cost.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiad_export.graphs import OPSET, _export
from hiad_export.pipeline_memory import MB, PIPELINE_MEMORY_MB, pipeline_cost
from hiad_runtime.bundle import SCHEMA_VERSION, GraphSpec, PipelineSpec, TensorSpec
from hiad_runtime.geometry import Box, Size
from hiad_train.model import HRModel

PIPELINE_FILE = "pipeline.onnx"


class PipelineUnsupported(ValueError):
    """The model has a step the pipeline graph cannot reproduce exactly; the message names it."""


def _features(out) -> tuple[torch.Tensor, ...]:
    """An embedder's output as a tuple of feature maps (a single tensor is the 1-tuple)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class AreaShrink(nn.Module):
    """OpenCV's INTER_AREA for uint8 NHWC images shrunk by whole factors, bit-exact.

    OpenCV averages each f_x x f_y block; it rounds half up for 2x2 blocks (its fast path) and
    otherwise rounds float32(sum) * float32(1 / area) to nearest even."""

    def __init__(self, source: Size, target: Size, what: str):
        super().__init__()
        fx, fy = source[0] // target[0], source[1] // target[1]
        if (fx * target[0], fy * target[1]) != tuple(source) or min(fx, fy) < 1:
            raise PipelineUnsupported(
                f"{what}: resizing {source[0]}x{source[1]} to {target[0]}x{target[1]} is not a whole-factor shrink "
                "(only those are reproduced exactly in the pipeline graph)"
            )
        self.fx, self.fy, self.target = fx, fy, target

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.fx == 1 and self.fy == 1:
            return image
        b = image.shape[0]
        w, h = self.target
        sums = image.float().reshape(b, h, self.fy, w, self.fx, 3).sum(dim=(2, 4))
        if self.fx == 2 and self.fy == 2:
            return torch.floor((sums + 2.0) * 0.25).to(torch.uint8)
        return torch.round(sums * (1.0 / (self.fx * self.fy))).to(torch.uint8)


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size_h, size_w), bilinear, half-pixel centres (cv2 INTER_LINEAR)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _reflect(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Pad by `radius` with scipy's 'reflect' (cv2.BORDER_REFLECT: the edge sample repeated)."""
    n = x.shape[dim]
    head = torch.flip(x.narrow(dim, 0, radius), [dim])
    tail = torch.flip(x.narrow(dim, n - radius, radius), [dim])
    return torch.cat([head, x, tail], dim)


class GaussianBlur(nn.Module):
    """cv2.GaussianBlur(map, (k, k), sigma, BORDER_REFLECT) on (B, H, W) maps, as two 1-D convolutions."""

    def __init__(self, sigma: float, truncate: float, size: Size, what: str = "postprocess.gaussian_sigma"):
        super().__init__()
        self.radius = int(truncate * sigma + 0.5)
        if self.radius >= min(size):
            raise PipelineUnsupported(f"{what}: blur radius {self.radius} exceeds the map {size[0]}x{size[1]}")
        kernel = cv2.getGaussianKernel(2 * self.radius + 1, sigma, cv2.CV_32F).ravel()
        self.register_buffer("kernel", torch.from_numpy(kernel.copy()))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        x = _reflect(_reflect(m[:, None], self.radius, 2), self.radius, 3)
        k = self.kernel.numel()
        x = F.conv2d(x, self.kernel.view(1, 1, k, 1))
        return F.conv2d(x, self.kernel.view(1, 1, 1, k))[:, 0]


class Normalize(nn.Module):
    """(x - minimum) / max(maximum - minimum, 1e-12) in float32, as the runtime's Normalization."""

    def __init__(self, normalization):
        super().__init__()
        span = max(normalization.maximum - normalization.minimum, 1e-12)
        self.register_buffer("minimum", torch.tensor(normalization.minimum, dtype=torch.float32))
        self.register_buffer("span", torch.tensor(span, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.minimum) / self.span


class Pipeline(nn.Module):
    """uint8 (B, H, W, 3) RGB at image_size -> anomaly_map (B, H, W), score (B,) [, decision, mask]."""

    def __init__(self, model: HRModel):
        super().__init__()
        plan = self.plan = model.plan
        tiling = self.tiling = plan.tiling
        self.image_size = tiling.image_size
        self.embedder = model.embedder.eval()
        fusion = plan.fusion()
        self.weights = [float(w) for w in (fusion.weight, *(level.weight for level in fusion.levels))]
        self.levels = fusion.levels  # per context level: distinct windows, per tile its window and offsets
        self.shrinks = nn.ModuleList()
        for k, level in enumerate(fusion.levels, start=1):
            sizes = {(w.width, w.height) for w in level.windows}
            if len(sizes) != 1:
                raise PipelineUnsupported(
                    f"tiling.ds_factors: context windows of level {k} differ in size {sorted(sizes)}"
                )
            self.shrinks.append(AreaShrink(sizes.pop(), tiling.patch_size, f"context windows of level {k}"))
        self.heads = nn.ModuleList(model.detectors[t.name].head().eval() for t in plan.tasks)
        norms = plan.normalization
        self.norms = nn.ModuleList(Normalize(norms[t.name]) if norms else nn.Identity() for t in plan.tasks)
        self.task_tiles = [list(t.tiles) for t in plan.tasks]
        self.routed = plan.routed
        if self.routed:
            self.register_buffer("centres", torch.from_numpy(plan.centres.astype("float32")))
        self.register_buffer("counts", self._overlap_counts())
        self.thumbnail = model.thumbnail
        if self.thumbnail is not None:
            t = self.thumbnail
            self.thumb_shrink = AreaShrink(self.image_size, plan.thumbnail_size, "thumbnail.size")
            self.thumb_embedder = t.embedder.eval()
            self.thumb_head = t.detector.head().eval()
            norm = plan.thumbnail_normalization
            self.thumb_norm = Normalize(norm) if norm is not None else nn.Identity()
        spec = self.post = plan.postprocess
        self.blur = (
            GaussianBlur(spec.gaussian_sigma, spec.gaussian_truncate, self.image_size)
            if spec.gaussian_sigma > 0
            else None
        )
        # per-tile blur (at each tile's size, and at the thumbnail's), when the detector asks for it
        sizes = {tiling.patch_size} | ({plan.thumbnail_size} if self.thumbnail is not None else set())
        self.tile_blurs = nn.ModuleDict(
            {
                f"{w}x{h}": GaussianBlur(
                    spec.tile_blur_sigma, spec.gaussian_truncate, (w, h), "postprocess.tile_blur_sigma"
                )
                for w, h in sizes
            }
            if spec.tile_blur_sigma > 0
            else {}
        )
        self.image_threshold = plan.image_threshold
        self.pixel_threshold = plan.pixel_threshold

    def _overlap_counts(self) -> torch.Tensor:
        try:
            counts = self.plan.overlap_counts
        except ValueError as e:
            raise PipelineUnsupported(f"tiling: {e}") from None
        return torch.from_numpy(counts.astype(np.float32))

    @property
    def output_names(self) -> list[str]:
        names = ["anomaly_map", "score"]
        names += ["decision"] if self.image_threshold is not None else []
        names += ["mask"] if self.pixel_threshold is not None else []
        return names

    def embed_tiles(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Fused features of every tile, tile-major within each image: tuple of (B * N, C_s, h_s, w_s)."""
        tiles = self.tiling.tiles
        b = image.shape[0]

        def stack(boxes: list[Box], shrink=None) -> torch.Tensor:
            crops = [image[:, bx.y : bx.y + bx.height, bx.x : bx.x + bx.width] for bx in boxes]
            x = torch.stack(crops, 1).reshape(b * len(boxes), boxes[0].height, boxes[0].width, 3)
            return x if shrink is None else shrink(x)

        fused = [f * self.weights[0] for f in _features(self.embedder(stack([t.main for t in tiles])))]
        for level, shrink, weight in zip(self.levels, self.shrinks, self.weights[1:]):
            window_feats = _features(self.embedder(stack(list(level.windows), shrink)))
            for s, wf in enumerate(window_feats):
                wf = wf.reshape(b, len(level.windows), *wf.shape[1:])
                gh, gw = int(fused[s].shape[-2]), int(fused[s].shape[-1])  # static: the geometry is fixed
                parts = []
                for owner, (up_w, up_h, ox, oy) in zip(level.owner, level.crops((gw, gh))):
                    parts.append(_upsample(wf[:, owner], (up_h, up_w))[:, :, oy : oy + gh, ox : ox + gw])
                fused[s] = fused[s] + weight * torch.stack(parts, 1).reshape(fused[s].shape)
        return tuple(fused)

    def tile_scores(self, feats: tuple[torch.Tensor, ...], b: int) -> list[torch.Tensor]:
        """Normalized score grid (B, h, w) of every tile, each by its task's head."""
        n = len(self.tiling.tiles)
        if self.routed:
            key = feats[0].mean(dim=(2, 3))
            key = key / torch.clamp((key * key).sum(1, keepdim=True).sqrt(), min=1e-12)
            d2 = (
                (key * key).sum(1, keepdim=True) - 2 * key @ self.centres.T + (self.centres * self.centres).sum(1)[None]
            )
            label = torch.argmin(d2, dim=1)
            scores = torch.stack([norm(head(*feats)) for head, norm in zip(self.heads, self.norms)], 1)
            index = label.view(-1, 1, 1, 1).expand(-1, 1, *scores.shape[-2:])
            chosen = torch.gather(scores, 1, index)[:, 0].reshape(b, n, *scores.shape[-2:])
            return [chosen[:, i] for i in range(n)]
        per_tile: list[torch.Tensor | None] = [None] * n
        for ids, head, norm in zip(self.task_tiles, self.heads, self.norms):
            sel = [f.reshape(b, n, *f.shape[1:])[:, ids].reshape(b * len(ids), *f.shape[1:]) for f in feats]
            s = norm(head(*sel))
            s = s.reshape(b, len(ids), *s.shape[1:])
            for j, i in enumerate(ids):
                per_tile[i] = s[:, j]
        return per_tile

    def tile_map(self, scores: torch.Tensor, size: Size) -> torch.Tensor:
        """A (B, h, w) score grid upsampled to `size` (w, h), then the optional per-tile blur."""
        up = _upsample(scores[:, None], (size[1], size[0]))[:, 0]
        blur = self.tile_blurs[f"{size[0]}x{size[1]}"] if len(self.tile_blurs) else None
        return up if blur is None else blur(up)

    def merge(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Each tile's map at its tile size, overlaps averaged into (B, H, W)."""
        width, height = self.image_size
        total = None
        for m, t in zip(maps, self.tiling.tiles):
            up = self.tile_map(m, (t.main.width, t.main.height))
            placed = F.pad(up, (t.main.x, width - t.main.x - t.main.width, t.main.y, height - t.main.y - t.main.height))
            total = placed if total is None else total + placed
        return total / self.counts

    def thumbnail_map(self, image: torch.Tensor) -> torch.Tensor:
        small = self.thumb_shrink(image)
        scores = self.thumb_norm(self.thumb_head(*_features(self.thumb_embedder(small))))
        small_map = self.tile_map(scores, self.plan.thumbnail_size)
        return _upsample(small_map[:, None], (self.image_size[1], self.image_size[0]))[:, 0]

    def image_score(self, m: torch.Tensor) -> torch.Tensor:
        if self.post.score_rule == "top_k_mean":
            k = min(self.post.score_top_k, m.shape[-1] * m.shape[-2])
            return torch.topk(m.reshape(m.shape[0], -1), k, dim=1).values.mean(dim=1)
        p = self.post.score_pool
        if m.shape[-1] < p or m.shape[-2] < p:
            return m.mean(dim=(1, 2))
        return F.avg_pool2d(m[:, None], p, p).amax(dim=(1, 2, 3))

    def forward(self, image: torch.Tensor):
        b = image.shape[0]
        anomaly_map = self.merge(self.tile_scores(self.embed_tiles(image), b))
        if self.thumbnail is not None:
            anomaly_map = torch.maximum(anomaly_map, self.thumbnail_map(image))
        if self.blur is not None:
            anomaly_map = self.blur(anomaly_map)
        score = self.image_score(anomaly_map)
        out = [anomaly_map, score]
        if self.image_threshold is not None:
            out.append(score >= self.image_threshold)
        if self.pixel_threshold is not None:
            out.append(anomaly_map >= self.pixel_threshold)
        return tuple(out)


def bundle_identity(files: dict[str, dict]) -> str:
    """sha256 over the sorted (path, sha256) pairs of the bundle's other files: names this bundle."""
    lines = "".join(f"{name} {info['sha256']}\n" for name, info in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def export_pipeline(
    model: HRModel, folder: Path, bundle_id: str, requested: bool = True, memory_mb: float = PIPELINE_MEMORY_MB
) -> tuple[PipelineSpec, str]:
    """Write pipeline.onnx into the bundle folder when asked for and within `memory_mb`; the spec and
    a line for the exporter's notes. Without a graph, the spec's `unsupported` says why: the step the
    graph cannot reproduce, or that it was not asked for, or its cost over the budget."""
    try:
        pipeline = Pipeline(model).eval()
    except PipelineUnsupported as e:
        return PipelineSpec(unsupported=str(e)), f"pipeline graph skipped: {e}"
    cost = pipeline_cost(pipeline, model.tiling.image_size)
    if not requested:
        why = f"not built: hiad-export --pipeline builds the whole-image graph, {cost.describe()}"
        return PipelineSpec(unsupported=why), f"pipeline graph {why}"
    if cost.total_mb > memory_mb:
        why = (
            f"left out: the whole-image graph runs all {len(model.tiling.tiles)} tiles at once, {cost.describe()}, "
            "over "
            f"the budget of {memory_mb:g} MB; it needs a machine with that memory (hiad-export --pipeline-memory "
            f"{cost.total_mb}) or a graph that streams tiles in chunks (not built yet)"
        )
        return PipelineSpec(unsupported=why), f"pipeline graph {why}"
    width, height = model.tiling.image_size
    example = torch.zeros(1, height, width, 3, dtype=torch.uint8)
    metadata = {
        "hiad.schema_version": str(SCHEMA_VERSION),
        "hiad.bundle_id": bundle_id,
        "hiad.image_width": str(width),
        "hiad.image_height": str(height),
        "hiad.image_threshold": "" if pipeline.image_threshold is None else repr(float(pipeline.image_threshold)),
        "hiad.pixel_threshold": "" if pipeline.pixel_threshold is None else repr(float(pipeline.pixel_threshold)),
    }
    outputs = {
        "anomaly_map": TensorSpec("anomaly_map", "float32", ["batch", height, width]),
        "score": TensorSpec("score", "float32", ["batch"]),
        "decision": TensorSpec("decision", "bool", ["batch"]),
        "mask": TensorSpec("mask", "bool", ["batch", height, width]),
    }
    names = pipeline.output_names
    # No constant folding: it would store a second copy of every bank chunk.
    _export(pipeline, (example,), folder / PIPELINE_FILE, ["image"], names, fold=False, metadata=metadata)
    graph = GraphSpec(
        file=PIPELINE_FILE,
        inputs=[TensorSpec("image", "uint8", ["batch", height, width, 3])],
        outputs=[outputs[n] for n in names],
        opset=OPSET,
    )
    size = sum(f.stat().st_size for f in folder.glob(PIPELINE_FILE + "*")) / MB
    return PipelineSpec(
        graph=graph, metadata=metadata
    ), f"pipeline graph built: {size:.1f} MB on disk, {cost.describe()}"
