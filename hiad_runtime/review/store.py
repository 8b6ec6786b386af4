"""The review store: every inspection kept on disk with its result, and the operators' labels beside it.

Layout (a contract: `hiad-train update` and `calibrate --review` read it through `ReviewStore`):

    DIR/items/<id>/        one inspection; <id> = YYYYMMDDTHHMMSSffffffZ-<6 hex>, so names sort by time
        image<ext>         the bytes as received (ext from the detected format)
        map.png            the anomaly map, 8-bit, scaled to record.map_range, at most 1024 px on its long side
        thumb.jpg          the image at most 256 px on its long side, for lists (optional: record.thumb)
        record.json        written last (tmp file, fsync, rename): a folder without it is incomplete
    DIR/labels.jsonl       one label per line, appended (O_APPEND, fsync per line); an id's last label wins

Crash safety: a kill -9 leaves at worst an item folder without record.json (ignored by readers, removed
when a writer opens the store) and a torn last line in labels.jsonl (skipped by readers, cut off when a
writer opens the store, so the next label starts on a line of its own). Eviction (`keep`, `keep_bytes`)
removes the oldest items first, record.json before the rest, so a kill midway leaves an incomplete folder;
labels of evicted items stay in labels.jsonl. Torch-free, and readers need no OpenCV: only `add` encodes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from hiad_runtime.files import fsync_dir

log = logging.getLogger(__name__)

ITEMS, LABELS, RECORD, MAP, THUMB = "items", "labels.jsonl", "record.json", "map.png", "thumb.jpg"
ID_PATTERN = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{6}")
LABEL_VALUES = ("good", "defect")
MAP_MAX_SIDE = 1024  # the stored map's long side: enough for an overlay, ~100 kB instead of a full-size map
THUMB_MAX_SIDE = 256  # a list shows many: a few kB each instead of decoding the full images
IMAGE_FORMATS = (  # leading bytes -> extension; anything else OpenCV decodes is kept as .bin
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"BM", ".bmp"),
)

LabelValue = Literal["good", "defect"]


class ReviewStoreError(ValueError):
    """A review store that cannot be opened or an entry that cannot be written; the message names it."""


@dataclass(frozen=True)
class Record:
    """One inspection as kept in record.json. `folder` (not in the JSON) is where its files are."""

    id: str
    time: str  # ISO 8601, UTC
    file: str | None  # the client's file name, when it sent one
    score: float
    decision: str | None  # "pass" or "flag"; None when the bundle has no image threshold
    threshold: float | None  # the image threshold the decision used
    bundle: str  # the bundle id (name and version) that scored it
    latency_ms: float  # request in to answer out
    width: int
    height: int
    image: str  # file name inside the folder: image.png, image.jpg, ...
    map_range: tuple[float, float] | None = None  # map.png: score = low + pixel / 255 * (high - low)
    pixel_threshold: float | None = None  # the mask is map >= pixel_threshold
    thumb: str | None = None  # the thumbnail's file name, when there is one
    folder: Path | None = field(default=None, compare=False)

    @property
    def image_path(self) -> Path:
        """The image file, as received."""
        return self._in_folder(self.image)

    @property
    def thumb_path(self) -> Path | None:
        """The thumbnail JPEG, or None."""
        return self._in_folder(self.thumb) if self.thumb is not None else None

    @property
    def map_path(self) -> Path | None:
        """The map PNG, or None when the inspection kept none."""
        return self._in_folder(MAP) if self.map_range is not None else None

    def _in_folder(self, name: str) -> Path:
        if self.folder is None:
            raise ReviewStoreError(f"record {self.id}: not read from a store (no folder)")
        return self.folder / name

    def to_json(self) -> dict:
        """record.json's content."""
        data = asdict(self)
        del data["folder"]
        data["map_range"] = list(self.map_range) if self.map_range is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict, folder: Path | None = None) -> "Record":
        """A record from record.json; keys this version does not know are ignored (newer writers may add some)."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "folder"}
        if known.get("map_range") is not None:
            known["map_range"] = tuple(float(v) for v in known["map_range"])
        return cls(**known, folder=folder)


@dataclass(frozen=True)
class Label:
    """An operator's verdict on one inspection: a line of labels.jsonl."""

    id: str
    label: LabelValue
    who: str
    when: str  # ISO 8601, UTC
    note: str = ""

    def __post_init__(self):
        if self.label not in LABEL_VALUES:
            raise ReviewStoreError(f"label {self.label!r}: expected one of {', '.join(LABEL_VALUES)}")
        if not ID_PATTERN.fullmatch(self.id):
            raise ReviewStoreError(f"label for {self.id!r}: not an inspection id")


_last_time = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
_id_lock = threading.Lock()


def new_id(now: dt.datetime) -> str:
    """A time-sortable inspection id: the UTC time to the microsecond and 6 random hex digits. Times are made
    strictly increasing within the process (a coarse clock gives two requests the same microsecond)."""
    global _last_time
    with _id_lock:
        now = max(now.astimezone(dt.timezone.utc), _last_time + dt.timedelta(microseconds=1))
        _last_time = now
    return f"{now:%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}"


def image_extension(data: bytes) -> str:
    """The extension of the format the leading bytes show (.bin for what is not recognized)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in IMAGE_FORMATS if data.startswith(magic)), ".bin")


class ReviewStore:
    """A review store at `path` (see the module docstring). `ReviewStore(path)` reads an existing store;
    `ReviewStore.open(path, ...)` is the writer's: it creates the store, finishes what a kill left, and evicts.

    Records are read once and cached; labels are read incrementally from where the last read stopped."""

    def __init__(self, path: str | Path, keep: int | None = None, keep_bytes: int | None = None):
        self.path = Path(path)
        if not (self.path / ITEMS).is_dir():
            raise ReviewStoreError(f"{self.path}: not a review store (no {ITEMS}/ folder)")
        if (keep is not None and keep < 1) or (keep_bytes is not None and keep_bytes < 1):
            raise ReviewStoreError(f"{self.path}: keep={keep}, keep_bytes={keep_bytes}: each must be >= 1")
        self.keep, self.keep_bytes = keep, keep_bytes
        self._lock = threading.RLock()
        self._records: dict[str, Record] = {}
        self._sizes: dict[str, int] = {}  # bytes of each complete item (writer's eviction)
        self._labels: dict[str, Label] = {}
        self._labels_read = 0  # bytes of labels.jsonl consumed (whole lines only)

    @classmethod
    def open(cls, path: str | Path, keep: int | None = None, keep_bytes: int | None = None) -> "ReviewStore":
        """The writer's store: created if missing; incomplete items removed, a torn label line cut off, then
        evicted down to `keep` items and `keep_bytes` bytes."""
        path = Path(path)
        try:
            (path / ITEMS).mkdir(parents=True, exist_ok=True)
            (path / LABELS).touch()
        except OSError as e:
            raise ReviewStoreError(f"{path}: cannot create a review store ({e.strerror})") from None
        store = cls(path, keep, keep_bytes)
        store._recover()
        store._evict()
        return store

    # -- reading -------------------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Ids of the complete items, newest first."""
        with os.scandir(self.path / ITEMS) as entries:
            names = [e.name for e in entries if ID_PATTERN.fullmatch(e.name)]
        return [
            n for n in sorted(names, reverse=True) if n in self._records or (self.path / ITEMS / n / RECORD).exists()
        ]

    def items(self, limit: int | None = None) -> list[Record]:
        """The records, newest first (the `limit` newest with one)."""
        out = []
        for item_id in self.ids():
            if limit is not None and len(out) >= limit:
                break
            if (record := self.item(item_id)) is not None:
                out.append(record)
        return out

    def item(self, item_id: str) -> Record | None:
        """The record of `item_id`, or None when there is no complete item of that id."""
        if not ID_PATTERN.fullmatch(item_id):
            return None
        with self._lock:
            if item_id in self._records:
                return self._records[item_id]
        folder = self.path / ITEMS / item_id
        try:
            record = Record.from_json(json.loads((folder / RECORD).read_text()), folder)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:  # written atomically: only a hand edit gets here
            log.warning("%s: unreadable record, skipped (%s)", folder / RECORD, e)
            return None
        with self._lock:
            self._records[item_id] = record
        return record

    def labels(self) -> dict[str, Label]:
        """Each id's latest label (labels of evicted items included); a torn or unreadable line is skipped."""
        with self._lock:
            try:
                with open(self.path / LABELS, "rb") as f:
                    f.seek(self._labels_read)
                    data = f.read()
            except FileNotFoundError:
                return dict(self._labels)
            whole = data[: data.rfind(b"\n") + 1]  # a line without its newline is still being written, or torn
            self._labels_read += len(whole)
            for line in whole.splitlines():
                try:
                    label = Label(**json.loads(line))
                except (ValueError, TypeError) as e:
                    log.warning("%s: line skipped (%s)", self.path / LABELS, e)
                    continue
                self._labels[label.id] = label
            return dict(self._labels)

    def labeled(self, label: LabelValue) -> list[Path]:
        """Image paths of the items (still in the store) whose latest label is `label`, newest first."""
        if label not in LABEL_VALUES:
            raise ReviewStoreError(f"label {label!r}: expected one of {', '.join(LABEL_VALUES)}")
        latest = self.labels()
        chosen = sorted((i for i, lab in latest.items() if lab.label == label), reverse=True)
        return [r.image_path for i in chosen if (r := self.item(i)) is not None]

    # -- writing -------------------------------------------------------------------------------------------

    def add(
        self,
        image: bytes,
        anomaly_map: np.ndarray | None,
        *,
        score: float,
        decision: bool | None,
        threshold: float | None,
        bundle: str,
        latency_ms: float,
        width: int,
        height: int,
        file: str | None = None,
        pixel_threshold: float | None = None,
        pixels: np.ndarray | None = None,
        now: dt.datetime | None = None,
        item_id: str | None = None,
    ) -> Record:
        """Keep one inspection: the image as received, its map (8-bit PNG), a thumbnail of `pixels` (the image
        decoded, RGB, any size), then its record; evict if over. `item_id` (from `new_id`) names it beforehand."""
        now = now or dt.datetime.now(dt.timezone.utc)
        item_id = item_id or new_id(now)
        if not ID_PATTERN.fullmatch(item_id):
            raise ReviewStoreError(f"{item_id!r}: not an inspection id")
        folder = self.path / ITEMS / item_id
        name = "image" + image_extension(image)
        map_range = None
        try:
            folder.mkdir()
            _write_synced(folder / name, image)
            if anomaly_map is not None:
                encoded, map_range = map_png8(anomaly_map)
                _write_synced(folder / MAP, encoded)
            if pixels is not None:
                _write_synced(folder / THUMB, thumbnail_jpeg(pixels))
            record = Record(
                id=item_id,
                time=now.astimezone(dt.timezone.utc).isoformat(timespec="microseconds"),
                file=file,
                score=float(score),
                decision=None if decision is None else ("flag" if decision else "pass"),
                threshold=threshold,
                bundle=bundle,
                latency_ms=round(float(latency_ms), 3),
                width=int(width),
                height=int(height),
                image=name,
                map_range=map_range,
                pixel_threshold=pixel_threshold,
                thumb=THUMB if pixels is not None else None,
                folder=folder,
            )
            _write_synced(folder / (RECORD + ".tmp"), json.dumps(record.to_json()).encode())
            os.replace(folder / (RECORD + ".tmp"), folder / RECORD)
            fsync_dir(folder)
            fsync_dir(folder.parent)
        except OSError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise ReviewStoreError(f"{folder}: cannot keep the inspection ({e.strerror or e})") from None
        with self._lock:
            self._records[item_id] = record
            self._sizes[item_id] = _folder_bytes(folder)
            self._evict()
        return record

    def label(self, item_id: str, label: LabelValue, who: str, note: str = "") -> Label:
        """Append a label for `item_id` (an item in the store); earlier labels stay, the latest wins."""
        if self.item(item_id) is None:
            raise ReviewStoreError(f"{item_id}: no such inspection in {self.path}")
        entry = Label(item_id, label, who, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), note)
        line = (json.dumps(asdict(entry), ensure_ascii=False) + "\n").encode()
        with self._lock:
            fd = os.open(self.path / LABELS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    def bytes_used(self) -> int:
        """Bytes of the complete items (as the writer counts them for `keep_bytes`)."""
        with self._lock:
            return sum(self._sizes.values())

    def _recover(self) -> None:
        """After a kill: remove incomplete items and eviction leftovers, cut a torn last label line."""
        for entry in (self.path / ITEMS).iterdir():
            if entry.is_dir() and not (entry / RECORD).exists():
                log.warning("%s: incomplete inspection (no %s) removed", entry, RECORD)
                shutil.rmtree(entry, ignore_errors=True)
            elif ID_PATTERN.fullmatch(entry.name):
                (entry / (RECORD + ".tmp")).unlink(missing_ok=True)
                self._sizes[entry.name] = _folder_bytes(entry)
        labels = self.path / LABELS
        data = labels.read_bytes()
        if data and not data.endswith(b"\n"):
            log.warning("%s: torn last line (%d bytes) cut off", labels, len(data) - data.rfind(b"\n") - 1)
            with open(labels, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                os.fsync(f.fileno())

    def _evict(self) -> None:
        """Remove the oldest items until at most `keep` items and `keep_bytes` bytes remain (the newest stays)."""
        with self._lock:
            order = sorted(self._sizes)
            total = sum(self._sizes.values())
            while len(order) > 1 and (
                (self.keep is not None and len(order) > self.keep)
                or (self.keep_bytes is not None and total > self.keep_bytes)
            ):
                oldest = order.pop(0)
                folder = self.path / ITEMS / oldest
                (folder / RECORD).unlink(missing_ok=True)  # incomplete from here on, whatever happens next
                shutil.rmtree(folder, ignore_errors=True)
                total -= self._sizes.pop(oldest)
                self._records.pop(oldest, None)


def map_png8(anomaly_map: np.ndarray) -> tuple[bytes, tuple[float, float]]:
    """The map as an 8-bit gray PNG (long side at most MAP_MAX_SIDE) and the score range its 0..255 span."""
    import cv2  # only writers encode

    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    h, w = anomaly_map.shape
    scale = min(1.0, MAP_MAX_SIDE / max(h, w))
    small = (
        anomaly_map
        if scale == 1.0
        else cv2.resize(anomaly_map, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    )
    pixels = np.round((small - low) / max(high - low, 1e-12) * 255).clip(0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise ReviewStoreError(f"cannot encode a {small.shape} map as PNG")
    return encoded.tobytes(), (low, high)


def thumbnail_pixels(pixels: np.ndarray) -> np.ndarray:
    """The image at most THUMB_MAX_SIDE on its long side: every k-th pixel down to about 4x that, then area
    averaging (milliseconds at 8K, where area averaging alone reads every pixel)."""
    import cv2

    h, w = pixels.shape[:2]
    step = max(1, max(h, w) // (4 * THUMB_MAX_SIDE))
    strided = pixels[::step, ::step]
    h, w = strided.shape[:2]
    scale = min(1.0, THUMB_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(strided, size, interpolation=cv2.INTER_AREA) if scale < 1 else np.ascontiguousarray(strided)


def thumbnail_jpeg(pixels: np.ndarray) -> bytes:
    """The RGB image (any size) as a JPEG thumbnail of at most THUMB_MAX_SIDE on its long side."""
    import cv2

    small = thumbnail_pixels(pixels)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ReviewStoreError(f"cannot encode a {small.shape} thumbnail as JPEG")
    return encoded.tobytes()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
