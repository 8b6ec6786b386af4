"""What memory this machine can spare, read from the kernel (no torch, no psutil): the default budget of
the task heads an Inspector keeps loaded.

A fixed default cannot fit every bundle: the CPU PaDiM at 2048^2 has 16 heads of 165 MB, and with
256 MB resident every image read 2.6 GB of heads again (0.09 images/s). The default is therefore a
share of the memory available when the bundle is loaded: a quarter of it, counted in head file bytes
as the budget is. A loaded head holds about its file's bytes, and up to twice that once it has run
(OpenVINO keeps each compiled graph's intermediate buffers: 160 MB -> 330 MB per PaDiM head), so the
heads take at most half the available memory, leaving the rest for the image, its map, the
embedder's arena and the machine. Never less than 256 MB (the earlier fixed default).
"""

from __future__ import annotations

from pathlib import Path

HEAD_MEMORY_SHARE = 0.25  # of the available memory, when no head memory is given
MIN_HEAD_MEMORY_MB = 256.0


CGROUP_LIMITS = (  # (limit, usage) of the cgroup a container runs in, as it sees them: v2, v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def available_bytes() -> int | None:
    """MemAvailable (/proc/meminfo), lowered to what a container's memory limit (cgroup v2 or v1) still
    allows; None where neither can be read (not Linux)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in CGROUP_LIMITS:
        try:
            found.append(int(Path(limit).read_text()) - int(Path(usage).read_text()))  # "max" (v2, no limit) is skipped
        except (OSError, ValueError):
            pass
    return max(min(found), 0) if found else None


def default_head_memory_mb() -> float:
    """HEAD_MEMORY_SHARE of the memory available now, in MB (MIN_HEAD_MEMORY_MB at least, and where unknown)."""
    available = available_bytes()
    if available is None:
        return MIN_HEAD_MEMORY_MB
    return max(MIN_HEAD_MEMORY_MB, HEAD_MEMORY_SHARE * available / 2**20)
