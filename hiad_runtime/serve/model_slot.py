"""The served model and its atomic replacement.

A request takes the current `LoadedModel` once and keeps it to the end, so requests in flight
finish on the model they started with while a reload swaps the reference. A new bundle is loaded,
checked (every file's sha256, via `Inspector.load`) and warmed up on a synthetic frame before the
swap; a bundle that fails any step is refused and the old model keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hiad_runtime.bundle import MANIFEST, BundleError
from hiad_runtime.inspector import Inspector


@dataclass(frozen=True)
class LoadedModel:
    inspector: Inspector
    path: Path
    bundle_id: str  # short sha256 of manifest.json @ its `created`
    created: str


def manifest_bytes(path: Path) -> bytes:
    """manifest.json of a bundle folder or .tar, as stored (the bundle id hashes these bytes)."""
    try:
        if path.is_file() and tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                member = next((m for m in tar.getmembers() if m.isfile() and Path(m.name).name == MANIFEST and len(Path(m.name).parts) <= 2), None)
                if member is None:
                    raise BundleError(f"{path}: not a bundle archive (no {MANIFEST})")
                return tar.extractfile(member).read()
        return (path / MANIFEST).read_bytes()
    except (OSError, tarfile.TarError) as e:
        raise BundleError(f"{path}: cannot read {MANIFEST} ({e})") from e


def load_model(path: str | Path, **options) -> LoadedModel:
    """Load, verify and warm up a bundle; BundleError names what is wrong with it."""
    path = Path(path).expanduser().resolve()
    raw = manifest_bytes(path)
    try:
        created = json.loads(raw)["created"]
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{path}: manifest has no readable 'created' ({e})") from e
    try:
        inspector = Inspector.load(path, **options)
        width, height = inspector.tiling.image_size
        warm = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        inspector.predict(warm)  # first runs allocate and optimize; no request should pay for that
    except BundleError:
        raise
    except Exception as e:  # a live server refuses whatever a bad bundle raises (ORT, faiss, numpy)
        raise BundleError(f"{path}: cannot be served ({type(e).__name__}: {e})") from e
    if created != inspector.manifest.created:
        raise BundleError(f"{path}: bundle changed while it was being loaded; try again")
    return LoadedModel(inspector, path, f"{hashlib.sha256(raw).hexdigest()[:12]}@{created}", created)


class ModelSlot:
    """Holds the model in service; `reload` replaces it only with a fully loaded, warmed-up one."""

    def __init__(self, **options):
        self.options = options  # Inspector options, the same for every bundle served
        self.current: LoadedModel | None = None
        self._reload_lock = threading.Lock()

    def reload(self, path: str | Path | None = None) -> LoadedModel:
        """Load `path` (default: the bundle being served, re-read from disk) and switch to it."""
        if path is None and self.current is None:
            raise BundleError("no bundle path given and none loaded yet")
        with self._reload_lock:  # one reload at a time; requests keep going meanwhile
            model = load_model(path if path is not None else self.current.path, **self.options)
            self.current = model  # one reference assignment: atomic for every reader
            return model
