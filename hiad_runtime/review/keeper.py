"""Keeping the service's inspections in the review store, off the request's path.

A request hands its inspection to `ReviewKeeper.submit` and is answered at once; one writer thread
writes the image, the map (an 8-bit PNG) and the record. The queue is bounded (each entry holds a body
and a map): when it is full the inspection is not kept, and that is counted (`dropped`, by reason, in
/metrics), never silent. Passes can be sampled (`pass_sample`), flagged images are always kept.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass, field

import numpy as np

from hiad_runtime.review.store import ReviewStore, ReviewStoreError

log = logging.getLogger("uvicorn.error")


@dataclass(frozen=True)
class ReviewSettings:
    """`serve --review-dir`: where inspections are kept, how many, and which."""

    folder: str
    keep: int | None = None  # items kept at most (oldest evicted first)
    keep_bytes: int | None = None  # bytes kept at most
    pass_sample: float = 1.0  # share of passing images kept (flagged ones always are)
    queue: int = 16  # inspections waiting to be written; one more is dropped and counted

    def __post_init__(self):
        wrong = [
            f"{k}={getattr(self, k)}"
            for k in ("keep", "keep_bytes")
            if getattr(self, k) is not None and getattr(self, k) < 1
        ]
        wrong += [f"pass_sample={self.pass_sample}"] if not 0 <= self.pass_sample <= 1 else []
        wrong += [f"queue={self.queue}"] if self.queue < 1 else []
        if wrong:
            raise ValueError(f"review settings out of range: {', '.join(wrong)}")


@dataclass
class Inspection:
    """One inspection to keep: the body as received and what the service answered."""

    image: bytes
    anomaly_map: np.ndarray
    thumb: np.ndarray | None  # RGB, small (`thumbnail_pixels`)
    fields: dict = field(default_factory=dict)  # ReviewStore.add's keyword arguments


class ReviewKeeper:
    """The writer thread in front of a `ReviewStore`, with its counters (kept, skipped, dropped by reason)."""

    def __init__(self, settings: ReviewSettings, seed: int | None = None):
        self.settings = settings
        self.store = ReviewStore.open(settings.folder, settings.keep, settings.keep_bytes)
        self.kept = 0
        self.skipped = 0  # passes left out by pass_sample
        self.dropped: dict[str, int] = {"queue_full": 0, "write_error": 0}
        self._random = random.Random(seed)
        self._queue: queue.Queue[Inspection | None] = queue.Queue(settings.queue)
        self._thread = threading.Thread(target=self._write_all, name="review-writer", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Inspections queued for writing."""
        return self._queue.qsize()

    def submit(self, inspection: Inspection) -> bool:
        """Queue an inspection for writing; False (and counted) when it is sampled out or the queue is full."""
        if inspection.fields.get("decision") is False and self._random.random() >= self.settings.pass_sample:
            self.skipped += 1
            return False
        try:
            self._queue.put_nowait(inspection)
        except queue.Full:
            self.dropped["queue_full"] += 1
            log.warning("review store: queue full (%d), inspection not kept", self.settings.queue)
            return False
        return True

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        self._queue.put(None)
        self._thread.join()

    def _write_all(self) -> None:
        while (inspection := self._queue.get()) is not None:
            try:
                self.store.add(inspection.image, inspection.anomaly_map, pixels=inspection.thumb, **inspection.fields)
                self.kept += 1
            except (ReviewStoreError, OSError) as e:
                self.dropped["write_error"] += 1
                log.error("review store: inspection not kept: %s", e)
