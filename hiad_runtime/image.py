"""Decode any inspection image to RGB uint8 and resize it with one recorded policy.

Training and the runtime both read images through here, so a bundle sees the same pixels the
detector was trained on. Grayscale, RGBA and 16-bit inputs are converted, never rejected.
Every decoding or resizing failure is an `ImageError` naming the input, never an OpenCV traceback,
and a pixel budget is checked against the header's declared size before anything is decoded (a PNG
of a few hundred kB can declare gigabytes of pixels).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from hiad_runtime.geometry import Size

# Written into every bundle's manifest; a C caller replicates it with OpenCV's cv::resize.
RESIZE_POLICY = {
    "library": "opencv",
    "shrink": "INTER_AREA",
    "enlarge": "INTER_LINEAR",
    "antialias": "area averaging when shrinking",
    "mask": "INTER_NEAREST",
}


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}  # what folders are searched for


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


def declared_size(data: bytes | Path, source: str = "image") -> tuple[int, int]:
    """(width, height) from the header of encoded bytes or a file alone (Pillow reads no pixel data for this)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                return im.size
    except Image.DecompressionBombError as e:
        raise ImageError(f"{source}: declares more pixels than the decoder allows ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"{source}: not a readable image (no image header Pillow recognizes)") from None


def decode(data: bytes, source: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, TIFF, BMP, ...) to RGB uint8.

    With `max_pixels`, the header's declared width x height is checked first and an image above the
    budget is refused before a single pixel is decoded.
    """
    if not data:
        raise ImageError(f"{source}: empty (0 bytes)")
    if max_pixels is not None:
        width, height = declared_size(data, source)
        if width * height > max_pixels:
            raise ImageError(f"{source}: declares {width}x{height} = {width * height} pixels, above the limit of {max_pixels}")
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ImageError(f"{source}: not a readable image (corrupt or unsupported format)")
        return _opencv_to_rgb8(raw, source)
    except cv2.error as e:
        raise ImageError(f"{source}: cannot be decoded ({_cv_reason(e)})") from None


def load_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file to RGB uint8; the error names the file.

    A file whose header Pillow reads is decoded into an array allocated from that header's size:
    OpenCV's Python binding would otherwise copy what it decoded into a new array, two image-sized
    buffers at the peak (400 MB at 8192^2; `decode` of bytes still pays it). Any other file, or one
    over `max_pixels`, takes `decode`'s path and its messages."""
    path = Path(path)
    try:
        width, height = declared_size(path, str(path))
        raw = None
        if max_pixels is None or width * height <= max_pixels:
            raw = cv2.imread(str(path), np.empty((height, width, 3), np.uint8), cv2.IMREAD_UNCHANGED)  # reallocated unless 8-bit 3-channel
        if raw is not None and raw.size:
            return _opencv_to_rgb8(raw, str(path))
    except (ImageError, OSError, cv2.error):
        pass
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read file ({e.strerror or e})") from e
    return decode(data, str(path), max_pixels)


def _opencv_to_rgb8(raw: np.ndarray, source: str) -> np.ndarray:
    """What OpenCV decoded with IMREAD_UNCHANGED (BGR order) -> RGB uint8, the colours swapped in place
    256 rows at a time (cvtColor's own in-place call copies the whole image first)."""
    if raw.ndim == 3 and raw.shape[2] >= 3:
        code = cv2.COLOR_BGRA2RGBA if raw.shape[2] == 4 else cv2.COLOR_BGR2RGB
        for top in range(0, raw.shape[0], 256):
            strip = raw[top : top + 256]
            cv2.cvtColor(strip, code, dst=strip)
    return to_rgb8(raw, source)


def size_warnings(input_size: Size, image_size: Size, aspect_tolerance: float = 0.05, min_fraction: float = 0.5) -> list[str]:
    """Why an input may score poorly although it decoded: a different aspect ratio (the resize
    distorts it) or a side far below image_size (the resize invents detail)."""
    found = []
    (w, h), (bw, bh) = input_size, image_size
    if abs(math.log((w / h) / (bw / bh))) > math.log1p(aspect_tolerance):
        found.append(f"aspect ratio {w / h:.3f} ({w}x{h}) differs from the bundle's {bw / bh:.3f} ({bw}x{bh}) by more than {aspect_tolerance:.0%}: the image is distorted by the resize")
    if w < min_fraction * bw or h < min_fraction * bh:
        found.append(f"{w}x{h} is far smaller than the bundle's image_size {bw}x{bh}: enlarged more than {1 / min_fraction:g}x")
    return found


def _cv_reason(error: cv2.error) -> str:
    """OpenCV's message without its source-file prefix, e.g. "pixels <= CV_IO_MAX_IMAGE_PIXELS"."""
    text = str(error).strip().splitlines()[0]
    return text.split("error: ", 1)[-1]


def load_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as bool (any non-zero pixel is anomalous)."""
    return load_image(path).max(axis=2) > 0


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """Resize RGB uint8 to (width, height) with the bundle's policy; a no-op at the right size."""
    width, height = size
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width * height < image.shape[1] * image.shape[0]
    try:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    except cv2.error as e:
        raise ImageError(f"image of shape {image.shape}: cannot be resized to {width}x{height} ({_cv_reason(e)})") from None


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    width, height = size
    if mask.shape[1] == width and mask.shape[0] == height:
        return mask
    try:
        return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    except cv2.error as e:
        raise ImageError(f"mask of shape {mask.shape}: cannot be resized to {width}x{height} ({_cv_reason(e)})") from None


def resize_map(anomaly_map: np.ndarray, size: Size) -> np.ndarray:
    """Resize a float anomaly map (bilinear, half-pixel centres as in torch's align_corners=False)."""
    width, height = size
    if anomaly_map.shape[1] == width and anomaly_map.shape[0] == height:
        return anomaly_map
    try:
        return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)
    except cv2.error as e:
        raise ImageError(f"map of shape {anomaly_map.shape}: cannot be resized to {width}x{height} ({_cv_reason(e)})") from None
