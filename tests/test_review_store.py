"""The review store: records and labels on disk, eviction, and what a kill -9 leaves (real processes, real files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from hiad_runtime.review.store import ITEMS, LABELS, RECORD, ReviewStore, ReviewStoreError

ROOT = Path(__file__).parents[1]


def _png(rng, size=(64, 96)) -> bytes:
    return cv2.imencode(".png", rng.integers(0, 255, size, dtype=np.uint8))[1].tobytes()


def _add(store: ReviewStore, rng, score: float = 0.3, decision: bool | None = False, **extra):
    anomaly_map = rng.random((64, 96)).astype(np.float32) * 2
    fields = dict(score=score, decision=decision, threshold=0.5, bundle="tiny.v1", latency_ms=12.5, width=96, height=64)
    return store.add(_png(rng), anomaly_map, **(fields | extra))


def test_records_round_trip_with_image_and_map(tmp_path):
    rng = np.random.default_rng(0)
    store = ReviewStore.open(tmp_path / "review")
    data = _png(rng)
    anomaly_map = np.linspace(-1, 3, 2048 * 1536, dtype=np.float32).reshape(1536, 2048)
    fields = dict(score=0.9, decision=True, threshold=0.5, bundle="b.v2", latency_ms=40.0, width=2048, height=1536)
    record = store.add(data, anomaly_map, file="m.png", pixel_threshold=1.5, **fields)

    again = ReviewStore(tmp_path / "review").item(record.id)  # a fresh reader sees what the writer wrote
    assert again == record and again.decision == "flag" and again.file == "m.png"
    assert again.image_path.name == "image.png" and again.image_path.read_bytes() == data
    stored_map = cv2.imread(str(again.map_path), cv2.IMREAD_UNCHANGED)
    assert stored_map.dtype == np.uint8 and stored_map.shape == (768, 1024)  # long side capped at 1024
    low, high = again.map_range
    assert (low, high) == pytest.approx((-1, 3))
    # the stored pixels give back the map's scores within one 8-bit step of its range
    back = low + stored_map.astype(np.float32) / 255 * (high - low)
    expected = cv2.resize(anomaly_map, (1024, 768), interpolation=cv2.INTER_AREA)
    assert np.abs(back - expected).max() <= (high - low) / 255
    assert json.loads((again.folder / RECORD).read_text())["time"].endswith("+00:00")


def test_items_newest_first_and_formats_by_content(tmp_path):
    rng = np.random.default_rng(1)
    store = ReviewStore.open(tmp_path)
    jpeg = cv2.imencode(".jpg", rng.integers(0, 255, (32, 32), dtype=np.uint8))[1].tobytes()
    first = _add(store, rng)
    second = store.add(
        jpeg, None, score=0.1, decision=None, threshold=None, bundle="b", latency_ms=1, width=32, height=32
    )
    assert [r.id for r in ReviewStore(tmp_path).items()] == [second.id, first.id]
    assert second.image == "image.jpg" and second.map_path is None and second.decision is None


def test_labels_append_and_last_wins(tmp_path):
    rng = np.random.default_rng(2)
    store = ReviewStore.open(tmp_path)
    a, b = _add(store, rng), _add(store, rng)
    store.label(a.id, "defect", "ana", "crack at the busbar")
    store.label(b.id, "good", "ben")
    store.label(a.id, "good", "carl", "a scratch on the glass, not a defect")
    lines = (tmp_path / LABELS).read_text().splitlines()
    assert len(lines) == 3  # appended, never overwritten
    reader = ReviewStore(tmp_path)
    assert {i: lab.label for i, lab in reader.labels().items()} == {a.id: "good", b.id: "good"}
    assert reader.labels()[a.id].who == "carl"
    assert reader.labeled("good") == [b.image_path, a.image_path] and reader.labeled("defect") == []
    with pytest.raises(ReviewStoreError, match="no such inspection"):
        store.label("20260101T000000000000Z-abcdef", "good", "ana")
    with pytest.raises(ReviewStoreError, match="expected one of good, defect"):
        store.label(a.id, "bad", "ana")


def test_eviction_oldest_first_by_count_and_bytes_labels_stay(tmp_path):
    rng = np.random.default_rng(3)
    store = ReviewStore.open(tmp_path, keep=3)
    made = [_add(store, rng) for _ in range(2)]
    store.label(made[0].id, "defect", "ana")  # its label outlives it
    made += [_add(store, rng) for _ in range(3)]
    assert [r.id for r in store.items()] == [r.id for r in made[:1:-1]]
    assert not made[0].folder.exists() and not made[1].folder.exists()
    kept = store.items()[0]
    store.label(kept.id, "defect", "ana")

    by_bytes = ReviewStore.open(tmp_path, keep_bytes=2 * store.bytes_used() // 3)  # reopened smaller: evicts at once
    assert [r.id for r in by_bytes.items()] == [made[4].id, made[3].id]
    assert by_bytes.bytes_used() <= 2 * store.bytes_used() // 3 + 1
    assert {made[0].id, kept.id} <= set(by_bytes.labels())  # labels are never rewritten
    assert by_bytes.labeled("defect") == [made[4].image_path]  # only items still in the store


def test_reader_needs_a_store(tmp_path):
    with pytest.raises(ReviewStoreError, match="not a review store"):
        ReviewStore(tmp_path / "nothing")


WRITER = """
import sys, numpy as np
from hiad_runtime.review.store import ReviewStore
store = ReviewStore.open(sys.argv[1], keep=40)
rng = np.random.default_rng(0)
image = bytes(rng.integers(0, 255, 300_000, dtype=np.uint8))
image = b"\\x89PNG\\r\\n\\x1a\\n" + image
i = 0
while True:
    r = store.add(image, rng.random((512, 512), dtype=np.float32), score=0.1, decision=False, threshold=0.5,
                  bundle="b", latency_ms=1.0, width=512, height=512)
    store.label(r.id, "good", "writer", "x" * 2000)
    i += 1
    if i == 5:
        print("ready", flush=True)
"""


def test_kill_9_while_writing_leaves_a_store_that_opens(tmp_path):
    """A process adding items and labels is killed at a random moment, five times; after each, the store opens,
    every record.json parses, every label line but a torn last one parses, and writing goes on."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = np.random.default_rng(4)
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(float(rng.uniform(0.0, 0.3)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for folder in (tmp_path / ITEMS).iterdir():  # before recovery: complete items parse, others lack a record
            if (folder / RECORD).exists():
                json.loads((folder / RECORD).read_text())
        store = ReviewStore.open(tmp_path, keep=40)
        records = store.items()
        assert records and all(r.image_path.exists() for r in records)
        assert sorted(p.name for p in (tmp_path / ITEMS).iterdir()) == sorted(r.id for r in records)
        assert (tmp_path / LABELS).read_bytes().endswith(b"\n")  # a torn line is cut: the next label stands alone
        for line in (tmp_path / LABELS).read_text().splitlines():
            json.loads(line)
        after = _add(store, np.random.default_rng(attempt))
        store.label(after.id, "defect", "test")
        assert ReviewStore(tmp_path).labels()[after.id].label == "defect"
