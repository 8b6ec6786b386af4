"""Anomaly-map overlays: the picture an operator looks at."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """RGB image under a JET heat layer of the map; a mask (truth or decision) outlined in green."""
    vmin = float(anomaly_map.min()) if vmin is None else vmin
    vmax = float(anomaly_map.max()) if vmax is None else vmax
    norm = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    if heat.shape[:2] != image.shape[:2]:
        heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    out = cv2.addWeighted(image, 0.55, heat, 0.45, 0)
    if mask is not None and mask.any():
        m = mask.astype(np.uint8)
        if m.shape != image.shape[:2]:
            m = cv2.resize(m, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), max(2, image.shape[0] // 400))
    return out


def save_rgb(path: str | Path, rgb: np.ndarray, max_side: int = 1024) -> None:
    """Write an RGB image as PNG, downscaled so its longer side is at most `max_side`."""
    scale = max_side / max(rgb.shape[:2])
    if scale < 1:
        rgb = cv2.resize(rgb, (int(rgb.shape[1] * scale), int(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise OSError(f"{path}: could not encode image")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(encoded)  # Python writes the file: OpenCV crashes on a name that is not UTF-8
