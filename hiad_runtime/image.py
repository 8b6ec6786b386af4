"""Decode any inspection image to RGB uint8 and resize it with one recorded policy.

Training and the runtime both read images through here, so a bundle sees the same pixels the
detector was trained on. Grayscale, RGBA and 16-bit inputs are converted, never rejected.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from hiad_runtime.geometry import Size

# Written into every bundle's manifest; a C caller replicates it with OpenCV's cv::resize.
RESIZE_POLICY = {
    "library": "opencv",
    "shrink": "INTER_AREA",
    "enlarge": "INTER_LINEAR",
    "antialias": "area averaging when shrinking",
    "mask": "INTER_NEAREST",
}


class ImageError(ValueError):
    """An input that cannot be turned into an RGB image; the message names the input."""


def to_rgb8(array: np.ndarray, source: str = "image") -> np.ndarray:
    """Convert a decoded array (gray, gray+alpha, RGB, RGBA; 8 or 16 bit) to contiguous RGB uint8.

    Channel order of 3/4-channel input is taken to be RGB(A); `load_image` handles OpenCV's BGR.
    """
    if array.dtype == np.uint16:
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"{source}: unsupported pixel type {array.dtype} (expected 8- or 16-bit integers)")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) == 0:
        raise ImageError(f"{source}: unsupported image shape {array.shape}")
    channels = array.shape[2]
    if channels <= 2:  # gray or gray + alpha
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif channels == 4:  # drop alpha: inspection images are opaque
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def decode(data: bytes, source: str = "image") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, TIFF, BMP, ...) to RGB uint8."""
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ImageError(f"{source}: not a readable image (corrupt or unsupported format)")
    if raw.ndim == 3 and raw.shape[2] >= 3:
        # In place: an 8192^2 image would otherwise hold a second 200 MB copy at its peak.
        raw = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA if raw.shape[2] == 4 else cv2.COLOR_BGR2RGB, dst=raw)
    return to_rgb8(raw, source)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file to RGB uint8; the error names the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read file ({e.strerror or e})") from e
    return decode(data, str(path))


def load_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as bool (any non-zero pixel is anomalous)."""
    return load_image(path).max(axis=2) > 0


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """Resize RGB uint8 to (width, height) with the bundle's policy; a no-op at the right size."""
    width, height = size
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width * height < image.shape[1] * image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    width, height = size
    if mask.shape[1] == width and mask.shape[0] == height:
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


def resize_map(anomaly_map: np.ndarray, size: Size) -> np.ndarray:
    """Resize a float anomaly map (bilinear, half-pixel centres as in torch's align_corners=False)."""
    width, height = size
    if anomaly_map.shape[1] == width and anomaly_map.shape[0] == height:
        return anomaly_map
    return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)
