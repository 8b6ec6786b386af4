"""File integrity and atomic publication, shared by checkpoints (training) and bundles (export).

A published folder `OUT` is a symlink to a complete version `OUT.v<N>` beside it. A new version is
written into a temporary sibling, renamed to `OUT.v<N+1>`, and `OUT` is re-pointed by renaming a
new symlink over it: one atomic step, so a reader of `OUT` (or a kill at any moment) sees the old
version or the new one, never a partial or missing folder. Superseded versions are removed once
they have been superseded for `grace_s`, so a reader that resolved `OUT` just before a publish can
finish loading. Temporary names carry the writer's pid; those of dead writers are removed on the
next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

GRACE_S = 600.0  # how long a superseded version stays on disk for readers that already resolved OUT
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def sha256_file(path: str | Path) -> str:
    """The file's sha256 as hex, read in 1 MiB blocks (a bundle's graphs and indexes can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (in this pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owned_tempdir(parent: Path, prefix: str) -> Path:
    """A new folder `<prefix><pid>-<random>` in `parent`: its name says which process owns it."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the `<prefix><pid>-...` entries of `parent` whose writer process is gone (a kill, a crash)."""
    removed = []
    for p in map(Path, glob.glob(os.path.join(glob.escape(str(parent)), glob.escape(prefix) + "*"))):
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def versions(target: Path) -> list[Path]:
    """The published versions `target.v<N>` beside `target`, oldest first."""
    pattern = re.compile(rf"{re.escape(target.name)}\.v(\d+)")
    found = [(int(m.group(1)), p) for p in target.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


@contextlib.contextmanager
def atomic_directory(target: str | Path, grace_s: float = GRACE_S) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success publish it as the new version behind `target`.

    If the body raises, `target` is left exactly as it was and the temporary directory is removed;
    after a kill it stays under a `.NAME.tmp-<pid>-` name that no loader reads and the next publish
    of `target` removes.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    remove_stale(target.parent, prefix)
    tmp = owned_tempdir(target.parent, prefix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; publish with normal permissions
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        publish(tmp, target, grace_s)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(folder: Path, target: Path, grace_s: float = GRACE_S) -> Path:
    """Rename the complete `folder` to the next `target.v<N>` and point the symlink `target` at it.

    A `target` that is a real folder (written before versions existed) is swapped with the new
    symlink in one step and kept as the version before, so nothing is deleted before the new
    version is in place.
    """
    if target.exists() and not target.is_symlink() and not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a folder; refusing to replace it")
    migrating = target.is_dir() and not target.is_symlink()
    previous = _next_version(target)
    version = previous.with_name(f"{target.name}.v{_number(previous) + 1}") if migrating else previous
    os.rename(folder, version)
    os.utime(version)  # its mtime now says when it was published (pruning counts the grace from it)
    link = target.with_name(f".{target.name}.tmp-{os.getpid()}-link")
    link.unlink(missing_ok=True)
    os.symlink(version.name, link)
    if migrating:
        _exchange(link, target)  # `target` is now the symlink; `link` holds the older export
        os.rename(link, previous)
    else:
        os.replace(link, target)
    fsync_dir(target.parent)
    _prune(target, version, grace_s)
    return version


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); elsewhere two renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return
    aside = a.with_name(a.name + "-aside")  # no atomic swap here: `b` is missing for one rename
    os.rename(b, aside)
    os.replace(a, b)
    os.rename(aside, a)


def _number(version: Path) -> int:
    return int(version.name.rsplit(".v", 1)[1])


def _next_version(target: Path) -> Path:
    existing = versions(target)
    return target.with_name(f"{target.name}.v{_number(existing[-1]) + 1 if existing else 1}")


def _prune(target: Path, current: Path, grace_s: float) -> None:
    """Remove each version whose successor was published more than `grace_s` ago (never `current`)."""
    published = versions(target)
    now = time.time()
    for old, successor in zip(published, published[1:]):
        if old != current and now - successor.stat().st_mtime > grace_s:
            shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable: fsync the folder itself."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
