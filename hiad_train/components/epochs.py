"""The epoch loop every epoch-trained detector shares: train, validate on held-out tiles with
synthetic anomalies, keep the best epoch (CheckpointSelector), stop early, restore the best state."""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm import tqdm

from hiad_train.validation import CheckpointSelector


def train_epochs(detector, config, data, step: Callable[[int], float], progress: bool = False) -> dict:
    """Run `step(epoch) -> mean loss` for up to config.total_epochs epochs; returns the training record.

    With a validation callback (val_config set), every `eval_interval` epochs the current state is
    scored; the best one by image AUROC (ties: mean of the other metrics) is restored at the end, and
    training stops after `patience` validations without improvement. Without one, the last epoch is kept.
    """
    selector = CheckpointSelector(patience=config.patience)
    best_state, best_metrics, loss = None, None, float("nan")
    bar = tqdm(range(1, config.total_epochs + 1), desc=f"{detector.name} epochs", leave=False, disable=not progress)
    epoch = 0
    for epoch in bar:
        loss = float(step(epoch))
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
        restored = type(detector).from_state(detector.config, best_state)
        detector.__dict__.update(restored.__dict__)
        record.update(selected_epoch=selector.best_epoch, selection_metrics=_finite(best_metrics))
    elif data.validate is not None:
        record["selection"] = "no finite validation metric: the last epoch is kept"
    return record


def _finite(metrics: dict) -> dict:
    return {k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()}

