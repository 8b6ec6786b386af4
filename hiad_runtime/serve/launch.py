"""Start `hiad-runtime serve` as a child process on a free local port and wait until it is ready:
what the service's tests and benchmark (and a supervisor script) need, written once."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def serving(
    bundle: Path,
    log: Path,
    *options: str,
    env: dict | None = None,
    wait_s: float = 120,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base url, process) once /readyz answers 200; the server's output goes to `log`.
    Raises RuntimeError (with the log) if it exits or is not ready within `wait_s`; stops it on exit.
    `preexec_fn` runs in the child before the server starts (e.g. to set a resource limit)."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hiad_runtime.cli", "serve", str(bundle), "--port", str(port), *options],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=preexec_fn,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while not _ready(url):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {wait_s:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)
