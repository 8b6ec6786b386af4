"""Decode any inspection image to RGB uint8 and resize it with one recorded policy.

Training and the runtime both read images through here, so a bundle sees the same pixels the
detector was trained on. Grayscale, RGBA and 16-bit inputs are converted, never rejected.
Every decoding or resizing failure is an `ImageError` naming the input, never an OpenCV traceback.
Before anything is decoded (`check_encoded`), a pixel budget is checked against the header's declared
size (a PNG of a few hundred kB can declare gigabytes of pixels) and a PNG or JPEG cut short is
refused (decoders would fill it in). Files, bytes, training data and calibration images all come
through `load_image` or `decode`, so each check holds on every path.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

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
MAX_PIXELS_FACTOR = 4  # default pixel budget of an input: this many times the expected image area
CAMERA_PIXELS = 8192 * 8192  # the largest photo a line takes (8K): training reads its photos at any image_size
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"  # start of image and the first marker
JPEG_EOI = b"\xff\xd9"  # end of image


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
    if channels <= 2:  # gray or gray + alpha: OpenCV replicates it 40x faster than np.repeat
        return cv2.cvtColor(np.ascontiguousarray(array[:, :, 0]), cv2.COLOR_GRAY2RGB)
    elif channels == 4:  # drop alpha: inspection images are opaque
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def declared_size(data: bytes | Path | BinaryIO, source: str = "image") -> tuple[int, int]:
    """(width, height) from the header of encoded bytes, a file or an open binary stream alone (Pillow
    reads no pixel data for this)."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        if not isinstance(stream, Path):
            stream.seek(0)  # the header, wherever an earlier check left the stream
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as im:
                return im.size
    except Image.DecompressionBombError as e:
        raise ImageError(f"{source}: declares more pixels than the decoder allows ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"{source}: not a readable image (no image header Pillow recognizes)") from None


def default_max_pixels(image_size: Size) -> int:
    """The pixel budget of an input when none is given: MAX_PIXELS_FACTOR times the area of `image_size`
    (the bundle's or the training config's). One rule for the CLI, the service, calibration and training."""
    return MAX_PIXELS_FACTOR * image_size[0] * image_size[1]


def source_max_pixels(image_size: Size) -> int:
    """The pixel budget of a training image, which is resized to `image_size`: the default budget, but at
    least an 8K photo (CAMERA_PIXELS), since training at a smaller size than the camera's is the rule."""
    return max(default_max_pixels(image_size), CAMERA_PIXELS)


def check_encoded(stream: BinaryIO, source: str = "image", max_pixels: int | None = None) -> None:
    """What is checked before anything is decoded: the header's width x height within `max_pixels`
    (when given), and a PNG or JPEG stream complete (`check_complete`)."""
    if max_pixels is not None:
        width, height = declared_size(stream, source)
        if width * height > max_pixels:
            raise ImageError(
                f"{source}: declares {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
            )
    check_complete(stream, source)


def check_complete(stream: BinaryIO, source: str = "image") -> None:
    """Refuse a PNG or JPEG stream that ends before its end marker (a file cut short by a copy or an upload).

    The decoders do not all refuse one: libjpeg reading a file fills the missing rows with grey, and
    OpenCV decoding into a given buffer returns that buffer whether or not it was written. A PNG is
    complete when its chunks, walked by their lengths, reach IEND; a JPEG when its segments before the
    first scan are whole and an end-of-image marker follows that scan (entropy-coded data cannot hold
    one: a 0xFF there is followed by 0x00 or a restart marker). Only chunk and segment headers and the
    stream's tail are read. Other formats are left to the decoder, which refuses them cut short.
    """
    kind = _format(stream)
    if kind is not None and not COMPLETE[kind][0](stream):
        raise ImageError(f"{source}: incomplete {kind} ({COMPLETE[kind][1]}: cut short in a copy or an upload?)")


def _format(stream: BinaryIO) -> str | None:
    """'PNG' or 'JPEG' by the stream's first bytes, else None."""
    stream.seek(0)
    magic = stream.read(8)
    return "PNG" if magic == PNG_SIGNATURE else "JPEG" if magic[:3] == JPEG_SOI else None


def _png_complete(stream: BinaryIO) -> bool:
    stream.seek(len(PNG_SIGNATURE))
    while len(head := stream.read(8)) == 8:
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            return len(stream.read(4)) == 4  # its CRC
        stream.seek(length + 4, io.SEEK_CUR)  # data and CRC; a seek past the end leaves nothing to read
    return False


def _jpeg_complete(stream: BinaryIO) -> bool:
    stream.seek(2)
    while True:  # marker segments up to the first scan (SOS)
        marker = stream.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return False
        kind = marker[1]
        while kind == 0xFF:  # fill bytes before a marker
            byte = stream.read(1)
            if not byte:
                return False
            kind = byte[0]
        if kind == 0x01 or 0xD0 <= kind <= 0xD7:  # standalone markers, no length
            continue
        if kind == 0xD9:  # end of image before any scan
            return False
        length = int.from_bytes(stream.read(2), "big")
        if length < 2:
            return False
        stream.seek(length - 2, io.SEEK_CUR)
        if kind == 0xDA:
            break
    scan, end = stream.tell(), stream.seek(0, io.SEEK_END)
    position = end  # search backwards from the end: a whole file ends with the marker (trailing data allowed)
    while position > scan:
        start = max(scan, position - (1 << 20))
        stream.seek(start)
        if JPEG_EOI in stream.read(min(position + 1, end) - start):  # one byte of overlap between blocks
            return True
        position = start
    return False


COMPLETE = {  # format -> (whether a stream is complete, what is missing when not)
    "PNG": (_png_complete, "the data ends before the IEND chunk"),
    "JPEG": (_jpeg_complete, "no end-of-image marker after the image data"),
}


def decode(data: bytes, source: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, TIFF, BMP, ...) to RGB uint8.

    `check_encoded` runs first: with `max_pixels`, an image whose header declares more pixels is
    refused before a single pixel is decoded, and a PNG or JPEG cut short is refused.
    """
    if not data:
        raise ImageError(f"{source}: empty (0 bytes)")
    check_encoded(io.BytesIO(data), source, max_pixels)
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ImageError(f"{source}: not a readable image (corrupt or unsupported format)")
        return _opencv_to_rgb8(raw, source)
    except cv2.error as e:
        raise ImageError(f"{source}: cannot be decoded ({_cv_reason(e)})") from None


def load_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file to RGB uint8, with `decode`'s checks (`check_encoded`); the error names the file.

    A complete PNG or JPEG whose header Pillow reads is decoded by OpenCV into an array allocated
    from that header's size: OpenCV's Python binding would otherwise copy what it decoded into a new
    array, two image-sized buffers at the peak (400 MB at 8192^2; `decode` of bytes still pays it).
    Any other file (and one OpenCV cannot take by name, see `_opencv_name`) is read and decoded as
    bytes. OpenCV is given the name only after the checks: its decode into a buffer reports no failure.
    """
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb", buffering=0) as stream:  # chunk headers only: 8 bytes read per chunk
            check_encoded(stream, source, max_pixels)
            size = _header_size(stream) if _format(stream) in COMPLETE else None
        name = _opencv_name(path)
        if size is not None and name is not None:
            width, height = size
            try:
                raw = cv2.imread(name, np.empty((height, width, 3), np.uint8), cv2.IMREAD_UNCHANGED)
                if raw is not None and raw.size:
                    return _opencv_to_rgb8(raw, source)
            except cv2.error:
                pass  # not 8-bit with 3 channels: the binding refuses the buffer; decoded as bytes below
        data = path.read_bytes()
    except ImageError:
        raise
    except (OSError, ValueError) as e:  # ValueError: a name with a NUL byte
        raise ImageError(f"{source}: cannot read file ({getattr(e, 'strerror', None) or e})") from None
    return decode(data, source, max_pixels)


def _header_size(stream: BinaryIO) -> tuple[int, int] | None:
    try:
        return declared_size(stream)
    except ImageError:
        return None


def _opencv_name(path: Path) -> str | None:
    """The file name as OpenCV may be given it, or None: its binding encodes a name as UTF-8 and
    crashes the process (SIGSEGV) on one that does not encode, such as a non-UTF-8 name on disk that
    Python holds with surrogate escapes."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name


def _opencv_to_rgb8(raw: np.ndarray, source: str) -> np.ndarray:
    """What OpenCV decoded with IMREAD_UNCHANGED (BGR order) -> RGB uint8, the colours swapped in place
    256 rows at a time (cvtColor's own in-place call copies the whole image first)."""
    if raw.ndim == 3 and raw.shape[2] >= 3:
        code = cv2.COLOR_BGRA2RGBA if raw.shape[2] == 4 else cv2.COLOR_BGR2RGB
        for top in range(0, raw.shape[0], 256):
            strip = raw[top : top + 256]
            cv2.cvtColor(strip, code, dst=strip)
    return to_rgb8(raw, source)


def size_warnings(
    input_size: Size, image_size: Size, aspect_tolerance: float = 0.05, min_fraction: float = 0.5
) -> list[str]:
    """Why an input may score poorly although it decoded: a different aspect ratio (the resize
    distorts it) or a side far below image_size (the resize invents detail)."""
    found = []
    (w, h), (bw, bh) = input_size, image_size
    if abs(math.log((w / h) / (bw / bh))) > math.log1p(aspect_tolerance):
        found.append(
            f"aspect ratio {w / h:.3f} ({w}x{h}) differs from the bundle's {bw / bh:.3f} ({bw}x{bh}) by more than "
            f"{aspect_tolerance:.0%}: the image is distorted by the resize"
        )
    if w < min_fraction * bw or h < min_fraction * bh:
        found.append(
            f"{w}x{h} is far smaller than the bundle's image_size {bw}x{bh}: enlarged more than {1 / min_fraction:g}x"
        )
    return found


def _cv_reason(error: cv2.error) -> str:
    """OpenCV's message without its source-file prefix, e.g. "pixels <= CV_IO_MAX_IMAGE_PIXELS"."""
    text = str(error).strip().splitlines()[0]
    return text.split("error: ", 1)[-1]


def load_mask(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool (any non-zero pixel is anomalous), with `load_image`'s checks."""
    return load_image(path, max_pixels).max(axis=2) > 0


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """Resize RGB uint8 to (width, height) with the bundle's policy; a no-op at the right size."""
    width, height = size
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width * height < image.shape[1] * image.shape[0]
    try:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    except cv2.error as e:
        raise ImageError(
            f"image of shape {image.shape}: cannot be resized to {width}x{height} ({_cv_reason(e)})"
        ) from None


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """A boolean mask (H, W) resized to `size` (width, height), nearest neighbour so it stays binary."""
    width, height = size
    if mask.shape[1] == width and mask.shape[0] == height:
        return mask
    try:
        return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    except cv2.error as e:
        raise ImageError(
            f"mask of shape {mask.shape}: cannot be resized to {width}x{height} ({_cv_reason(e)})"
        ) from None


def resize_map(anomaly_map: np.ndarray, size: Size) -> np.ndarray:
    """Resize a float anomaly map (bilinear, half-pixel centres as in torch's align_corners=False)."""
    width, height = size
    if anomaly_map.shape[1] == width and anomaly_map.shape[0] == height:
        return anomaly_map
    try:
        return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)
    except cv2.error as e:
        raise ImageError(
            f"map of shape {anomaly_map.shape}: cannot be resized to {width}x{height} ({_cv_reason(e)})"
        ) from None
