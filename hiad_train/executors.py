"""Where the trainer's naturally parallel work runs: the feature pass over batches of images and the
fit of one detector per task.

A `Stage` is a function applied to every item of a list, with inputs every item shares. The
trainer builds the stages; an executor only decides where each call runs. `LocalExecutor` runs them
in this process, in order (the single-machine path); `RayExecutor` (hiad_train/distributed.py) runs
them as Ray tasks. Both call the same functions on the same inputs, so a run's results do not
depend on the executor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tqdm import tqdm

from hiad_train.components.threads import torch_threads
from hiad_train.config import TaskResources

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
