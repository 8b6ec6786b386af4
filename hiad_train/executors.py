"""Where the trainer's naturally parallel work runs: the feature pass over batches of images and the
fit of one detector per task.

A `Stage` is a function applied to every item of a list, with inputs every item shares. The
trainer builds the stages; an executor only decides where each call runs. `LocalExecutor` runs them
in this process, in order, on one device (the single-machine path); `DeviceExecutor` in one spawned
worker process per device (several GPUs: each worker pinned to its GPU, items shared out as workers
free up); `RayExecutor` (hiad_train/distributed.py) runs them as Ray tasks. All call the same functions
on the same inputs, so on one kind of device a run's results do not depend on the executor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing
from tqdm import tqdm

from hiad_train.components.threads import torch_threads
from hiad_train.config import TaskResources
from hiad_train.device import Devices

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """`work(shared, item)` for every item; `labels` name the items in progress, logs and errors."""

    name: str  # "features" or "tasks"
    work: Callable[[Any, Any], Any]
    shared: Any
    items: Sequence  # read one at a time (the trainer's task inputs are gathered when read)
    labels: list[str]
    resources: TaskResources
    retries: int = 0  # further attempts of an item whose worker dies or which raises (where the executor retries)

    @property
    def threads(self) -> int:
        """PyTorch threads per item, wherever it runs: floating-point sums (a backward pass) can depend on
        the thread count, so it is part of what is computed, not of where."""
        return max(1, int(self.resources.num_cpus))


class StageFailed(RuntimeError):
    """An item of a stage failed for good (after its retries, where the executor retries)."""

    def __init__(self, label: str, error: str):
        super().__init__(f"{label} failed: {error}")
        self.label = label


class LocalExecutor:
    """Runs every stage in this process, item after item."""

    in_process = True  # detectors may draw their own progress bars

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}  # stage -> item label -> seconds

    def extract(self, stage: Stage, progress: bool = False) -> list:
        return self.run(stage, progress)

    def fit(self, stage: Stage, progress: bool = False) -> list:
        return self.run(stage, progress)

    def run(self, stage: Stage, progress: bool = False) -> list:
        results = []
        with torch_threads(stage.threads):
            for label, item in tqdm(
                zip(stage.labels, stage.items), total=len(stage.items), desc=stage.name, disable=not progress
            ):
                start = time.perf_counter()
                results.append(stage.work(stage.shared, item))
                self.record(stage.name, label, time.perf_counter() - start)
        return results

    def record(self, stage: str, label: str, seconds: float, where: str = "this process") -> None:
        """Keep and log one item's time (the training log's per-task times)."""
        self.seconds.setdefault(stage, {})[label] = seconds
        logger.info("%s %s: %.2f s on %s", stage, label, seconds, where)


def on_device(shared: Any, device: torch.device) -> Any:
    """A stage's shared inputs (a dataclass with a `device` field) for items run on `device`."""
    return dataclasses.replace(shared, device=device)


def local_executor(devices: Devices) -> LocalExecutor:
    """The executor of a run on this machine: this process for one device, one worker process per device for several."""
    return LocalExecutor() if len(devices) == 1 else DeviceExecutor(devices)


class DeviceExecutor(LocalExecutor):
    """One worker process per device, spawned for each stage and pinned to its device (`torch.cuda.set_device`);
    each takes the next item as it frees up, so the items are shared out by how long they take. Shared inputs
    travel once per worker, items and results as torch's multiprocessing pickles them (tensors through shared
    memory, every tensor on the CPU). An item that raises, or whose worker dies, fails the stage by name."""

    in_process = False

    def __init__(self, devices: Devices):
        super().__init__()
        self.devices = devices

    def run(self, stage: Stage, progress: bool = False) -> list:
        context = torch.multiprocessing.get_context("spawn")
        slots = context.Queue()
        for device in self.devices.all:
            slots.put(str(device))
        results: list = [None] * len(stage.items)
        queued = iter(enumerate(stage.items))  # TaskInputsList: a task's inputs are gathered when it is queued
        index: dict = {}
        with (
            ProcessPoolExecutor(
                len(self.devices), context, initializer=_start_worker, initargs=(slots, stage.shared, stage.threads)
            ) as pool,
            tqdm(total=len(results), desc=stage.name, disable=not progress) as bar,
        ):
            while True:
                while len(index) < 2 * len(self.devices):  # a next item ready for each worker, no more held
                    i, item = next(queued, (None, None))
                    if i is None:
                        break
                    index[pool.submit(_run_item, stage.work, item)] = i
                if not index:
                    break
                done, _ = wait(index, return_when=FIRST_COMPLETED)
                for future in done:
                    i = index.pop(future)
                    try:
                        results[i], seconds, where = future.result()
                    except BrokenProcessPool as e:
                        _cancel(index)
                        raise StageFailed(stage.labels[i], f"its worker process died ({e})") from None
                    except Exception as e:
                        _cancel(index)
                        raise StageFailed(stage.labels[i], f"{type(e).__name__}: {e}") from None
                    self.record(stage.name, stage.labels[i], seconds, where)
                    bar.update()
        return results


_WORKER: dict = {}  # in a DeviceExecutor worker: its device and the stage's shared inputs placed there


def _start_worker(slots, shared: Any, threads: int) -> None:
    """A worker's start: take one device off the queue, pin this process to it."""
    device = torch.device(slots.get())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads)  # as the local executor: the same sums wherever the item runs
    _WORKER.update(device=device, shared=on_device(shared, device))


def _run_item(work: Callable[[Any, Any], Any], item: Any) -> tuple[Any, float, str]:
    start = time.perf_counter()
    result = work(_WORKER["shared"], item)
    return result, time.perf_counter() - start, f"{_WORKER['device']} (worker {os.getpid()})"


def _cancel(futures) -> None:
    for future in futures:
        future.cancel()
