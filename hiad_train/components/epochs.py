"""What every epoch-trained detector shares: its networks built under `seeded(seed)`, one optimization
pass per epoch (`optimize`), and the epoch loop (`train_epochs`): train, validate on held-out tiles
with synthetic anomalies, keep the best epoch (CheckpointSelector), stop early, restore the best state."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hiad_train.device import Precision, autocast, module_device

Batch = TypeVar("Batch")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """PyTorch's global generator seeded with `seed` inside, and restored on exit: what is built inside
    (a detector's network) depends on the seed alone, and nothing outside sees the draws."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def optimize(
    module: nn.Module,
    batches: Iterable[Batch],
    loss: Callable[[Batch], torch.Tensor],
    optimizers: Sequence[torch.optim.Optimizer],
    weight: Callable[[Batch], int] | None = None,
    precision: Precision = "fp32",
) -> float:
    """One epoch of `module` in training mode: per batch, the loss (its forward passes under bf16 autocast
    on the module's device when `precision` is bf16), zero_grad, backward and a step of every optimizer.
    Returns the mean batch loss, or the mean weighted by `weight(batch)` (e.g. its sample count) when
    given. Leaves `module` in eval mode."""
    module.train()
    device = module_device(module)
    losses, total, count = [], 0.0, 0
    for batch in batches:
        with autocast(device, precision):
            value = loss(batch)
        for optimizer in optimizers:
            optimizer.zero_grad()
        value.backward()
        for optimizer in optimizers:
            optimizer.step()
        if weight is None:
            losses.append(value.item())
        else:
            w = weight(batch)
            total, count = total + value.item() * w, count + w
    module.eval()
    return float(np.mean(losses)) if weight is None else total / count


@dataclass
class CheckpointSelector:
    """Keeps the best epoch by validation image AUROC, ties broken by the mean of the other metrics;
    stops after `patience` epochs without improvement. For detectors trained over epochs."""

    patience: int = 5
    best_epoch: int | None = None
    best_key: tuple = field(default=(-np.inf, -np.inf))
    since_best: int = 0

    def update(self, epoch: int, metrics: dict) -> bool:
        """Record an epoch's validation metrics; True when it is the new best (save it)."""
        others = [v for k, v in metrics.items() if k != "image_auroc" and np.isfinite(v)]
        auroc = metrics.get("image_auroc", -np.inf)
        key = (auroc if np.isfinite(auroc) else -np.inf, float(np.mean(others)) if others else -np.inf)
        if key > self.best_key:
            self.best_key, self.best_epoch, self.since_best = key, epoch, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.since_best >= self.patience


def train_epochs(detector, config, data, step: Callable[[], float], progress: bool = False) -> dict:
    """Run `step() -> mean loss` (one epoch) for up to config.total_epochs epochs; returns the training record.

    With a validation callback (val_config set), every `eval_interval` epochs the current state is
    scored; the best one by image AUROC (ties: mean of the other metrics) is restored at the end, and
    training stops after `patience` validations without improvement. Without one, the last epoch is kept.
    """
    selector = CheckpointSelector(patience=config.patience)
    best_state, best_metrics, loss = None, None, float("nan")
    bar = tqdm(range(1, config.total_epochs + 1), desc=f"{detector.name} epochs", leave=False, disable=not progress)
    epoch = 0
    for epoch in bar:
        loss = float(step())
        postfix = {"loss": f"{loss:.4g}"}
        if data.validate is not None and epoch % config.eval_interval == 0:
            metrics = data.validate(detector)
            postfix["auroc"] = f"{metrics.get('image_auroc', float('nan')):.3f}"
            usable = any(np.isfinite(v) for v in metrics.values())
            if usable and selector.update(epoch, metrics):
                best_state = {k: v.detach().clone() for k, v in detector.state().items()}
                best_metrics = metrics
            if usable and selector.should_stop:
                bar.set_postfix(postfix)
                break
        bar.set_postfix(postfix)
    record = {"epochs_run": epoch, "final_loss": loss, "selected_epoch": epoch, "selection_metrics": None}
    if best_state is not None:
        detector.load_state(best_state)
        record.update(selected_epoch=selector.best_epoch, selection_metrics=_finite(best_metrics))
    elif data.validate is not None:
        record["selection"] = "no finite validation metric: the last epoch is kept"
    return record


def _finite(metrics: dict) -> dict:
    return {k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()}
