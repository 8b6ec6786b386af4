"""The served model and its atomic replacement.

A request leases the current `LoadedModel` and keeps it to the end, so requests in flight finish on
the model they started with while a reload swaps the reference. A new bundle is loaded, checked
(every file's sha256, via `Bundle.load`) and warmed up on a synthetic frame before the swap; a
bundle that fails any step is refused and the old model keeps serving.

The bundle is named by the path it was given: a published `OUT` (a symlink to its current version
`OUT.v<N>`) is resolved anew at each reload, so a reload serves what was published last. The folder
a `.tar` bundle was extracted into is removed once its model is replaced and its last lease ends.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from hiad_runtime.bundle import MANIFEST, Bundle, BundleError, bundle_id, remove_extraction
from hiad_runtime.inspector import Inspector
from hiad_runtime.options import RuntimeOptions


class LoadedModel:
    """A bundle ready to serve, with the requests using it counted (`acquire`/`release`)."""

    def __init__(self, inspector: Inspector, source: Path, bundle_id: str, created: str):
        self.inspector = inspector
        self.source = source  # the path as given: a published symlink or a .tar stays itself
        self.bundle_id = bundle_id  # short sha256 of manifest.json @ its `created`
        self.created = created
        self._users = 0
        self._retired = self._closed = False
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The folder the files are read from: the version `source` resolved to, or the extraction."""
        return self.inspector.bundle.root

    def acquire(self) -> bool:
        """Count one more user; False once the model was replaced and its files released."""
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        """One user fewer; the last one out of a replaced model removes its extracted files."""
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0 and not self._closed
            self._closed |= close
        if close:
            remove_extraction(self.path)

    def retire(self) -> None:
        """Replaced: release the files as soon as no request uses them."""
        with self._lock:
            self._retired = True
            close = self._users == 0 and not self._closed
            self._closed |= close
        if close:
            remove_extraction(self.path)


def load_model(source: str | Path, options: RuntimeOptions) -> LoadedModel:
    """Load, verify and warm up a bundle; BundleError names what is wrong with it."""
    source = Path(source).expanduser().absolute()
    try:
        bundle = Bundle.load(source)  # resolves a published symlink once; extracts a .tar
    except OSError as e:
        raise BundleError(f"{source}: cannot be read ({e})") from e
    try:
        inspector = Inspector(bundle, options)
        width, height = inspector.tiling.image_size
        warm = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        inspector.predict(warm)  # first runs allocate and optimize; no request should pay for that
        raw = (bundle.root / MANIFEST).read_bytes()
        if json.loads(raw).get("created") != inspector.manifest.created:
            raise BundleError(f"{source}: bundle changed while it was being loaded; try again")
    except BaseException as e:
        remove_extraction(bundle.root)
        if isinstance(e, BundleError) or not isinstance(e, Exception):
            raise
        # a live server refuses whatever a bad bundle raises (ORT, faiss, numpy)
        raise BundleError(f"{source}: cannot be served ({type(e).__name__}: {e})") from e
    created = inspector.manifest.created
    return LoadedModel(inspector, source, bundle_id(raw), created)


class ModelSlot:
    """Holds the model in service; `reload` replaces it only with a fully loaded, warmed-up one."""

    def __init__(self, options: RuntimeOptions):
        self.options = options  # how every bundle served is run
        self.current: LoadedModel | None = None
        self._reload_lock = threading.Lock()

    def lease(self) -> LoadedModel | None:
        """The model in service, acquired (release it when done); None while none is loaded."""
        while True:
            model = self.current
            if model is None or model.acquire():
                return model
            # replaced and released between the read and the acquire: the next read is the new one

    def reload(self, path: str | Path | None = None) -> LoadedModel:
        """Load `path` (default: the path of the bundle being served, resolved anew) and switch to it."""
        if path is None and self.current is None:
            raise BundleError("no bundle path given and none loaded yet")
        with self._reload_lock:  # one reload at a time; requests keep going meanwhile
            model = load_model(path if path is not None else self.current.source, self.options)
            previous, self.current = self.current, model  # one reference assignment: atomic for every reader
            if previous is not None:
                previous.retire()
            return model

    def close(self) -> None:
        """At shutdown, once no request runs: release the model in service."""
        with self._reload_lock:
            previous, self.current = self.current, None
            if previous is not None:
                previous.retire()
