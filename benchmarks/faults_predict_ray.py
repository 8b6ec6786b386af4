"""`hiad-runtime predict --ray local` against the local command, with the faults a long run meets.

Writes `--images` ELPV demo modules at 2048x2048 (or takes `--inputs`), then runs, each as its own process:
1. the local command (the reference: its records and every map's sha256);
2. `--ray local --actors 2`, with one actor process killed by SIGKILL once `--kill-after` records are written;
3. `--ray local --actors 2` with the driver killed by SIGKILL after `--kill-after` records, then the same command
   with `--resume`.
Each Ray run must write the reference's records (latency aside: every input once, in input order) and maps.
Maps are hashed and removed after each run (200 maps at 2048^2 are 3.2 GB). Prints images/s and the load.
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/faults_predict_ray.py models/demo/bundle --images 200
(a check with figures, not a test: tests/test_predict_ray.py is the test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = ["--ray", "local", "--actors", "2", "--threads", "1"]


def records(out: Path) -> list[dict]:
    """results.jsonl's records, latency left out."""
    lines = (out / "results.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "latency_ms"} for line in lines]


def take_maps(out: Path) -> dict[str, str]:
    """Every file beside results.jsonl by sha256, then removed."""
    hashes = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in ("results.jsonl", ".predict.lock"):
            hashes[p.relative_to(out).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    for sub in out.iterdir():
        if sub.is_dir():
            shutil.rmtree(sub)
    return hashes


def command(bundle: Path, inputs: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "hiad_runtime.cli", "predict", str(bundle), str(inputs), "--out", str(out), *extra]


def lines(out: Path) -> int:
    path = out / "results.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def descendants(pid: int) -> list[int]:
    """The process ids under `pid` now (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def run(cmd: list[str], out: Path, kill_after: int | None = None, victim: str = "") -> tuple[int, str, str]:
    """Run `cmd`; with `kill_after`, SIGKILL an actor process (victim 'actor') or the driver ('driver') once the
    run has written that many records. Returns (exit code, what was killed, stdout)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, tree = "", []
    while kill_after is not None and not killed and proc.poll() is None:
        time.sleep(0.2)
        if lines(out) < kill_after:
            continue
        tree = descendants(proc.pid)
        if victim == "driver":
            os.kill(proc.pid, signal.SIGKILL)
            killed = f"the driver (pid {proc.pid}) after {lines(out)} records"
        else:
            actors = [p for p in tree if title(p).startswith("ray::Scorer")]
            if actors:
                os.kill(actors[0], signal.SIGKILL)
                killed = f"actor process {actors[0]} ({title(actors[0])}) after {lines(out)} records"
    stdout, _ = proc.communicate()
    if victim == "driver":
        time.sleep(5)  # Ray's own processes notice their driver is gone
        left = [p for p in tree if title(p)]
        for p in left:  # what this run started and left behind, by id
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed += f"; {len(left)} of its {len(tree)} child processes still alive 5 s later, killed"
    return proc.returncode, killed, stdout


def rate(stdout: str) -> str:
    found = re.search(r"([\d.]+) images/s", stdout)
    return found.group(1) if found else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--inputs", type=Path, help="score this folder instead of generated images")
    parser.add_argument("--kill-after", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="faults-predict-ray-") as tmp:
        tmp = Path(tmp)
        inputs = args.inputs
        if inputs is None:
            from hiad_train.data.elpv import build_elpv_demo

            inputs = build_elpv_demo(tmp / "data", n_train=0, n_test=args.images, seed=1) / "test"
        print(f"inputs {inputs}; load average {os.getloadavg()[0]:.1f} at start", flush=True)

        def step(name, cmd, out, **kill):
            start = time.perf_counter()
            code, killed, stdout = run(cmd, out, **kill)
            wall = time.perf_counter() - start
            print(f"{name}: exit {code}, {rate(stdout)} images/s, {wall:.0f} s, load {os.getloadavg()[0]:.1f}")
            if killed:
                print(f"  killed {killed}")
            return code, stdout

        ref_out = tmp / "local"
        code, stdout = step("local", command(args.bundle, inputs, ref_out, ["--threads", "2"]), ref_out)
        if code:
            raise SystemExit(stdout[-2000:])
        reference, ref_maps = records(ref_out), take_maps(ref_out)
        print(f"  {len(reference)} records, {len(ref_maps)} maps", flush=True)

        def check(name, out):
            got, maps = records(out), take_maps(out)
            names = [r["input"] for r in got]
            duplicated = len(names) - len(set(names))
            same = got == reference and maps == ref_maps
            print(
                f"  {name}: {len(got)} records ({duplicated} duplicated), equal to the local run's records and "
                f"maps: {same}",
                flush=True,
            )
            return same

        ok = True
        out = tmp / "ray_kill_actor"
        code, _ = step(
            "ray, an actor killed",
            command(args.bundle, inputs, out, RAY),
            out,
            kill_after=args.kill_after,
            victim="actor",
        )
        ok &= code == 0 and check("ray, an actor killed", out)
        out = tmp / "ray_kill_driver"
        step(
            "ray, driver killed",
            command(args.bundle, inputs, out, RAY),
            out,
            kill_after=args.kill_after,
            victim="driver",
        )
        print(f"  {lines(out)} complete lines left", flush=True)
        code, _ = step("ray --resume", command(args.bundle, inputs, out, [*RAY, "--resume"]), out)
        ok &= code == 0 and check("ray, driver killed then --resume", out)
        print("ALL EQUAL" if ok else "DIFFERENCES FOUND")


if __name__ == "__main__":
    main()
