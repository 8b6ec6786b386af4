"""Training on a Ray cluster (`hiad-train CONFIG ... --ray ADDRESS`, extra `[ray]`).

`RayExecutor` runs the trainer's stages as Ray tasks: the feature pass by batches of images (each
worker reads its images from their paths, which every node must see) and one detector fit per task.
Each task reserves the resources of its config section `distributed`, is retried when its worker
dies or it raises (at most `max_retries` times), and returns plain data: features as numpy arrays,
a detector's state as safetensors bytes. A task runs on the GPU Ray gives it (its section's
`num_gpus` > 0: Ray sets CUDA_VISIBLE_DEVICES, so it is `cuda:0` there), else on its worker's CPU.
With `ship_features`, the driver runs the feature pass itself (on its `device:`) and the fits receive
the features through Ray's object store (no shared storage needed).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import ray
import torch

from hiad_train.device import CPU
from hiad_train.executors import LocalExecutor, Stage, StageFailed, on_device

FAULT_ENV = "HIAD_FAULT"  # test-only fault injection: "<item label>:kill-once" or "<item label>:raise"


class RayExecutor(LocalExecutor):
    """Runs the trainer's stages as Ray tasks on the cluster `connect` joined."""

    in_process = False

    def __init__(self, ship_features: bool = False):
        super().__init__()
        self.ship_features = ship_features

    def extract(self, stage: Stage, progress: bool = False) -> list:
        return LocalExecutor.run(self, stage, progress) if self.ship_features else self.run(stage, progress)

    def run(self, stage: Stage, progress: bool = False) -> list:
        """Every item as a Ray task; results in item order. The first item that fails for good fails the
        stage (StageFailed with its label and the worker's error) and cancels the rest."""
        from tqdm import tqdm

        res = stage.resources
        remote = ray.remote(_attempt)
        options = dict(
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            memory=None if res.memory_mb is None else res.memory_mb << 20,
            max_retries=stage.retries,
            retry_exceptions=True,
        )
        shared = ray.put(stage.shared)
        fault = _fault_from_env()
        index = {
            remote.options(**options, name=f"{stage.name}:{label}").remote(
                stage.work, shared, item, label, stage.threads, fault
            ): i
            for i, (label, item) in enumerate(zip(stage.labels, stage.items))
        }
        results: list = [None] * len(index)
        pending = list(index)
        with tqdm(total=len(index), desc=stage.name, disable=not progress) as bar:
            while pending:
                (ref,), pending = ray.wait(pending, num_returns=1)
                label = stage.labels[index[ref]]
                try:
                    result, seconds, host = ray.get(ref)
                except ray.exceptions.RayError as e:
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise StageFailed(label, f"after {stage.retries + 1} attempt(s): {_worker_error(e)}") from None
                results[index[ref]] = result
                self.record(stage.name, label, seconds, host)
                bar.update()
        return results


def _attempt(work, shared, item, label: str, threads: int, fault):
    """One attempt of one item on a worker, on the task's device: (result, seconds, host and device)."""
    torch.set_num_threads(threads)  # as the local executor: the same sums, whatever the worker process had
    _inject(fault, label)
    device = task_device()
    start = time.perf_counter()
    result = work(on_device(shared, device), item)
    return result, time.perf_counter() - start, f"{socket.gethostname()} ({device})"


def task_device() -> torch.device:
    """The device of the Ray task running here: the first GPU Ray assigned it (CUDA_VISIBLE_DEVICES lists
    only those, so it is cuda:0 in this process), else the CPU."""
    return torch.device("cuda", 0) if ray.get_gpu_ids() else CPU


def _worker_error(error: ray.exceptions.RayError) -> str:
    cause = getattr(error, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"


def _fault_from_env() -> tuple[str, str, str] | None:
    """HIAD_FAULT, read on the driver (test-only): which item fails, how, and the marker file that
    lets `kill-once` kill only the first attempt (on a path the retry's node sees: the local cluster)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    label, _, mode = spec.rpartition(":")
    if not label or mode not in {"kill-once", "raise"}:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected '<item label>:kill-once' or '<item label>:raise'")
    return label, mode, os.path.join(tempfile.mkdtemp(prefix="hiad-fault-"), "attempted")


def _inject(fault, label: str) -> None:
    if fault is None or fault[0] != label:
        return
    _, mode, marker = fault
    if mode == "raise":
        raise RuntimeError(f"fault injected by {FAULT_ENV}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker dies mid-task, as when a node is lost
