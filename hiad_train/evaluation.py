"""Evaluators with HiAD's signature: (prediction_scores, gt_labels, prediction_masks, gt_masks,
device=None, **kw) -> {metric: value}. Any callable of that shape plugs in as a custom evaluator."""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import cv2
import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

Evaluator = Callable[..., dict]


def _resized(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], resize: int | None):
    """Score maps (bilinear) and masks (nearest) at resize x resize, or as they are."""
    if resize is None:
        return [np.asarray(m, np.float32) for m in maps], [np.asarray(g, bool) for g in masks]
    size = (resize, resize)
    return (
        [cv2.resize(np.asarray(m, np.float32), size, interpolation=cv2.INTER_LINEAR) for m in maps],
        [cv2.resize(np.asarray(g, np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0 for g in masks],
    )


def image_auroc(prediction_scores, gt_labels, prediction_masks=None, gt_masks=None, device=None, **kw) -> dict:
    labels = np.asarray(gt_labels).astype(int)
    if labels.min() == labels.max():
        return {"image_auroc": float("nan")}
    return {"image_auroc": float(roc_auc_score(labels, np.asarray(prediction_scores, np.float64)))}


def pixel_metrics(
    prediction_scores, gt_labels, prediction_masks, gt_masks, device=None, resize: int | None = None, **kw
) -> dict:
    """Pixel AUROC, pixel AP and the best pixel F1 over thresholds."""
    maps, masks = _resized(prediction_masks, gt_masks, resize)
    scores = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([g.ravel() for g in masks])
    if truth.all() or not truth.any():
        return {"pixel_auroc": float("nan"), "pixel_ap": float("nan"), "pixel_f1_max": float("nan")}
    precision, recall, _ = precision_recall_curve(truth, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return {
        "pixel_auroc": float(roc_auc_score(truth, scores)),
        "pixel_ap": float(average_precision_score(truth, scores)),
        "pixel_f1_max": float(f1.max()),
    }


def aupro(
    prediction_scores,
    gt_labels,
    prediction_masks,
    gt_masks,
    device=None,
    resize: int | None = None,
    fpr_limit: float = 0.3,
    **kw,
) -> dict:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by it (MVTec AD's AUPRO).

    PRO(t) is the mean, over connected ground-truth regions, of the fraction of the region scored
    above t; FPR(t) is the fraction of normal pixels above t. All thresholds at once: sort pixels by
    score, and accumulate 1/(region size * number of regions) for region pixels and 1/normals for others.
    """
    maps, masks = _resized(prediction_masks, gt_masks, resize)
    scores, weights_pro, is_normal = [], [], []
    n_regions = 0
    labelled = []
    for g in masks:
        lab, n = ndimage.label(g)
        labelled.append((lab, n))
        n_regions += n
    if n_regions == 0:
        return {"aupro": float("nan")}
    for m, (lab, n) in zip(maps, labelled):
        sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
        w = np.where(lab.ravel() > 0, 1.0 / (sizes[lab.ravel()] * n_regions), 0.0)
        scores.append(m.ravel())
        weights_pro.append(w)
        is_normal.append(lab.ravel() == 0)
    scores = np.concatenate(scores)
    weights_pro = np.concatenate(weights_pro)
    is_normal = np.concatenate(is_normal)
    order = np.argsort(-scores, kind="stable")
    scores, weights_pro, is_normal = scores[order], weights_pro[order], is_normal[order]
    pro = np.cumsum(weights_pro)
    fpr = np.cumsum(is_normal) / max(is_normal.sum(), 1)
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]  # one point per distinct threshold
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:  # close the curve at the limit by linear interpolation
        y_lim = np.interp(fpr_limit, fpr, pro)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return {"aupro": float(np.trapezoid(y, x) / fpr_limit)}


def default_evaluators(resize: int | None = 512) -> list[Evaluator]:
    return [image_auroc, partial(pixel_metrics, resize=resize), partial(aupro, resize=resize)]


def evaluate(prediction_scores, gt_labels, prediction_masks, gt_masks, evaluators: Sequence[Evaluator]) -> dict:
    results: dict = {}
    for evaluator in evaluators:
        results.update(evaluator(prediction_scores, gt_labels, prediction_masks, gt_masks, device=None))
    return results


def format_table(metrics: dict) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric'.ljust(width)} | value", f"{'-' * width}-|-------"]
    lines += [
        f"{k.ljust(width)} | {v:.4f}" if isinstance(v, float) else f"{k.ljust(width)} | {v}" for k, v in metrics.items()
    ]
    return "\n".join(lines)
