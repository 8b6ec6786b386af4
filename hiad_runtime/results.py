"""The output folder of `hiad-runtime predict`: locked, never clobbered, written record by record.

One run owns the folder at a time (an exclusive `flock` on `OUT/.predict.lock`, released by the
kernel even after `kill -9`). A folder holding anything but that lock is refused unless the caller
asks to overwrite, so a mistyped rerun cannot empty an earlier run's results, or to resume it. Each
image's record is appended to `results.jsonl` and flushed as soon as the image is done (its map
written before), so a killed run keeps every finished record and a resumed one (`resume=True`) skips
exactly the inputs recorded there: a record cut short by the kill is dropped and its input scored
again. Maps and overlays mirror each input's path (extension included) relative to the folder all
inputs share, so no two inputs write the same map.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
from pathlib import Path
from typing import IO, Iterable

from hiad_runtime.image import IMAGE_SUFFIXES

RESULTS = "results.jsonl"
LOCK = ".predict.lock"
OUTPUTS = (RESULTS, "maps", "overlays")  # what a run writes, and what --overwrite replaces


class OutputError(RuntimeError):
    """An output folder that this run must not write to; the message says why and what to do."""


LIST_SUFFIX = ".txt"  # an input with this suffix is a list of inputs, one per line
GLOB_CHARS = set("*?[")


class InputError(ValueError):
    """An input argument that lists nothing: a pattern matching no file, a list file that cannot be read."""


def find_inputs(paths: Iterable[Path]) -> list[Path]:
    """Image files given directly, found under given folders (recursively), matched by a glob pattern
    (`'data/**/*.png'`, quoted: `**` spans folders) or listed in a `.txt` file (one path per line, relative
    to the current folder; blank lines and `#` comments skipped), each once, in order."""
    found: dict[str, Path] = {}
    for p in paths:
        for f in _expand(Path(p)):
            found.setdefault(os.path.abspath(f), f)
    return list(found.values())


def _expand(p: Path) -> list[Path]:
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if p.suffix.lower() == LIST_SUFFIX and p.is_file():
        try:
            lines = p.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: cannot read this list of inputs ({getattr(e, 'strerror', None) or e})") from None
        listed = [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return [f for entry in listed for f in (_expand(entry) if entry.is_dir() else [entry])]
    if not p.exists() and GLOB_CHARS & set(str(p)):
        matched = sorted(glob.glob(str(p), recursive=True))
        if not matched:
            raise InputError(f"{p}: no file matches this pattern")
        return [f for m in map(Path, matched) for f in (_expand(m) if m.is_dir() else [m])]
    return [p]  # a file (one that cannot be read is reported when it is scored, with the others)


def output_keys(files: list[Path]) -> list[str]:
    """Each file's path relative to the deepest folder holding all of them, extension kept.

    `a/m.png` and `b/m.png` become `a/m.png` and `b/m.png`; `x.png` and `x.jpg` stay apart; a single
    folder's files keep their path inside it. Distinct files always get distinct keys.
    """
    absolute = [os.path.abspath(f) for f in files]
    if not absolute:
        return []
    common = os.path.commonpath([os.path.dirname(a) for a in absolute])
    return [Path(os.path.relpath(a, common)).as_posix() for a in absolute]


class ResultsFolder:
    """`with ResultsFolder(out, overwrite, resume) as folder:` lock `out`, then `folder.record(...)` per image.

    With `resume`, an earlier run's results stay and `folder.recorded` holds the inputs they record."""

    def __init__(self, out: Path, overwrite: bool = False, resume: bool = False):
        if overwrite and resume:
            raise OutputError("--overwrite and --resume exclude each other: replace the earlier results, or continue")
        self.out = Path(out)
        self.overwrite = overwrite
        self.resume = resume
        self.lock_path = self.out / LOCK
        self.recorded: set[str] = set()  # the "input" of every record already in results.jsonl (resume)
        self._lock: IO | None = None
        self._results: IO | None = None

    def __enter__(self) -> "ResultsFolder":
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.lock_path, "a")
        except OSError as e:
            raise OutputError(f"{self.out}: cannot be used as the output folder ({e.strerror or e})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise OutputError(
                f"{self.out}: another run is writing here (it holds {self.lock_path}); wait for it or choose another "
                "--out"
            ) from None
        try:
            earlier = sorted(p.name for p in self.out.iterdir() if p.name != LOCK)
            if self.resume:
                self.recorded = _recorded_inputs(self.results_path)
            elif earlier and not self.overwrite:
                raise OutputError(
                    f"{self.out}: not empty ({', '.join(earlier[:5])}{', ...' if len(earlier) > 5 else ''}); "
                    "pass --resume to continue an earlier run, --overwrite to replace its results, or choose another "
                    "--out"
                )
            else:
                for name in OUTPUTS:
                    target = self.out / name
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
            self._results = open(self.results_path, "a")
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if self._results is not None:
            self._results.close()
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock

    @property
    def results_path(self) -> Path:
        """`results.jsonl`: one JSON record per finished image."""
        return self.out / RESULTS

    def map_path(self, key: str) -> Path:
        """Where the map of input `key` goes (`maps/<key>.npy`), its folder made."""
        return self._file("maps", f"{key}.npy")

    def overlay_path(self, key: str) -> Path:
        """Where the overlay of input `key` goes (`overlays/<key>.png`), its folder made."""
        return self._file("overlays", f"{key}.png")

    def _file(self, folder: str, name: str) -> Path:
        path = self.out / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def record(self, line: dict) -> None:
        """Append one JSON line and flush it to the OS, so it survives the process being killed."""
        self._results.write(json.dumps(line) + "\n")
        self._results.flush()


def _recorded_inputs(results: Path) -> set[str]:
    """The inputs an earlier run recorded; a last line cut short (the run killed while writing it) is
    removed, so its input is scored again and the next record starts on a line of its own."""
    if not results.is_file():
        return set()
    data = results.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(results, "r+b") as f:
            f.truncate(len(complete))
    recorded = set()
    for number, line in enumerate(complete.decode("utf-8", "replace").splitlines(), 1):
        try:
            recorded.add(json.loads(line)["input"])
        except (ValueError, KeyError, TypeError):
            raise OutputError(f"{results}: line {number} is not a record of this tool; not resuming into it") from None
    return recorded
