"""Task checkpoints in safe formats only: JSON for structure, safetensors for tensors. No pickle.

Layout of a checkpoint directory (written atomically):
  checkpoint.json            format/version, detector, config, tiling, tasks, training records, file sha256s
  embedder_patch.safetensors the detector's embedder, shared by all tasks
  tasks/<task>.safetensors   each task detector's state (PatchCore: the memory bank; others: weights)
  thumbnail/                 embedder + detector of the low-resolution branch, when configured
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hiad_runtime.bundle import CheckpointRef
from hiad_runtime.files import atomic_directory, sha256_file
from hiad_runtime.geometry import Tiling
from hiad_runtime.postprocess import Normalization, PostprocessSpec
from hiad_runtime.tasks import Task
from hiad_train import __version__
from hiad_train.config import ConfigError, parse_config
from hiad_train.detectors import get_detector
from hiad_train.model import HRModel, Thumbnail

FORMAT = "hiad-checkpoint"
VERSION = 2


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(model: HRModel, out: str | Path, data: str | Path | None = None) -> Path:
    """Write atomically; `data` (the training data folder) lets export find held-back images."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        (tmp / "tasks").mkdir()
        save_file(model.embedder.state_dict(), tmp / "embedder_patch.safetensors")
        for task in model.tasks:
            save_file(_contiguous(model.detectors[task.name].state()), tmp / "tasks" / f"{task.name}.safetensors")
        thumbnail = None
        if model.thumbnail is not None:
            (tmp / "thumbnail").mkdir()
            save_file(model.thumbnail.embedder.state_dict(), tmp / "thumbnail" / "embedder.safetensors")
            save_file(_contiguous(model.thumbnail.detector.state()), tmp / "thumbnail" / "detector.safetensors")
            norm = model.thumbnail.normalization
            thumbnail = {
                "size": list(model.thumbnail.size),
                "normalization": None if norm is None else norm.to_dict(),
                "training": model.thumbnail.training,
            }
        if model.routing is not None:
            save_file({"centres": torch.from_numpy(model.routing)}, tmp / "routing.safetensors")
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*.safetensors"))}
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "producer": f"hiad-train {__version__}",
            "detector": model.config.detector,
            "config": model.config.model_dump(mode="json"),
            "tiling": model.tiling.to_dict(),
            "tasks": [t.to_dict() for t in model.tasks],
            "training": model.training,
            "thumbnail": thumbnail,
            "postprocess": model.postprocess.to_dict(),
            "task_normalization": None
            if model.task_normalization is None
            else {k: v.to_dict() for k, v in model.task_normalization.items()},
            "thresholds": model.thresholds,
            "validation": model.validation,
            "files": files,
            "data": None if data is None else str(Path(data).absolute()),
        }
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=1))
    return out


def checkpoint_ref(path: str | Path) -> CheckpointRef:
    """How a bundle names the checkpoint at `path`: the folder as given (a published name stays itself) and
    checkpoint.json's sha256, which pins the version."""
    path = Path(path)
    return CheckpointRef(str(path.absolute()), sha256_file(path / "checkpoint.json"))


def load_checkpoint(path: str | Path) -> HRModel:
    """The HRModel saved at `path` by `save_checkpoint`, ready to predict or export.

    Refuses (CheckpointError, naming the file) a folder without checkpoint.json, another format or
    version, a tensor file that is missing or whose sha256 differs, and a config or detector this
    code cannot read. Tensors are read from safetensors only (nothing is unpickled); each detector is
    rebuilt from its config and its state (`Detector.from_state`)."""
    path = Path(path)
    meta_file = path / "checkpoint.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no checkpoint.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        hint = " (written by an earlier hiad-train: retrain)" if meta.get("version") == 1 else ""
        raise CheckpointError(f"{meta_file}: unsupported format {meta.get('format')} v{meta.get('version')}{hint}")
    for name, digest in meta["files"].items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise CheckpointError(f"{f}: missing or altered (sha256 mismatch)")
    try:
        config = parse_config(meta["config"], str(meta_file))
        detector_cls = get_detector(meta["detector"])
    except (ConfigError, KeyError) as e:
        raise CheckpointError(str(e)) from None
    embedder = detector_cls.build_embedder(config.patch, pretrained=False)
    embedder.load_state_dict(load_file(path / "embedder_patch.safetensors"))
    tasks = [Task.from_dict(t) for t in meta["tasks"]]
    detectors = {
        t.name: detector_cls.from_state(config.patch, load_file(path / "tasks" / f"{t.name}.safetensors"))
        for t in tasks
    }
    thumbnail = None
    if meta["thumbnail"] is not None:
        emb = detector_cls.build_embedder(config.thumbnail, pretrained=False)
        emb.load_state_dict(load_file(path / "thumbnail" / "embedder.safetensors"))
        det = detector_cls.from_state(config.thumbnail, load_file(path / "thumbnail" / "detector.safetensors"))
        tn = meta["thumbnail"].get("normalization")
        size = tuple(meta["thumbnail"]["size"])
        thumbnail = Thumbnail(
            size, emb, det, None if tn is None else Normalization(**tn), meta["thumbnail"].get("training")
        )
    routing = None
    if (path / "routing.safetensors").is_file():
        routing = load_file(path / "routing.safetensors")["centres"].numpy()
    norm = meta.get("task_normalization")
    return HRModel(
        routing=routing,
        task_normalization=None if norm is None else {k: Normalization(**v) for k, v in norm.items()},
        thresholds=meta.get("thresholds"),
        training=meta.get("training") or {},
        validation=meta.get("validation"),
        config=config,
        tiling=Tiling.from_dict(meta["tiling"]),
        tasks=tasks,
        embedder=embedder,
        detectors=detectors,
        postprocess=PostprocessSpec.from_dict(
            {k: v for k, v in meta["postprocess"].items() if k != "clip_to_unit"}
        ),  # dropped in #11
        thumbnail=thumbnail,
    )


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items()}
