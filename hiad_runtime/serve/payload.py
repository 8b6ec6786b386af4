"""What goes over the wire: the image out of a request body, the maps into PNGs for the answer."""

from __future__ import annotations

import base64
from typing import AsyncGenerator

import cv2
import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import Request


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise HTTPException(413, f"body of {int(declared)} bytes exceeds the limit of {limit_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise HTTPException(413, f"body exceeds the limit of {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, limit_bytes: int) -> bytes:
    """The encoded image: the raw body, or the one file part of a multipart/form-data body."""
    body = await read_body(request, limit_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def stored() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stored(), max_files=1, max_fields=8).parse()
    except Exception as e:  # Starlette's and python-multipart's parse errors
        raise HTTPException(400, f"malformed multipart body ({e})") from e
    try:
        files = [v for v in form.values() if isinstance(v, UploadFile)]
        if not files:
            raise HTTPException(400, "multipart body has no file part (send the image as a file field)")
        return await files[0].read()
    finally:
        await form.close()


def png_base64(array: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"cannot encode a {array.dtype} {array.shape} array as PNG")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def map_png(anomaly_map: np.ndarray) -> dict:
    """The anomaly map as a 16-bit gray PNG with the range that maps 0..65535 back to scores
    (the map's own range: normalized scores are not bounded, so no fixed range is lossless)."""
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    scaled = (anomaly_map - low) / max(high - low, 1e-12)
    return {
        "png_base64": png_base64(np.round(scaled * 65535).astype(np.uint16)),
        "size": [anomaly_map.shape[1], anomaly_map.shape[0]],
        "range": [low, high],  # score = range[0] + pixel / 65535 * (range[1] - range[0])
    }


def mask_png(mask: np.ndarray) -> dict:
    """The thresholded mask as an 8-bit PNG: 255 anomalous, 0 normal."""
    return {"png_base64": png_base64(mask.astype(np.uint8) * 255), "size": [mask.shape[1], mask.shape[0]]}
