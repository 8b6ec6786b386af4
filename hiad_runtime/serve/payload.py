"""What goes over the wire: the image out of a request body, the maps into PNGs for the answer."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import AsyncGenerator

import cv2
import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from hiad_runtime.serve.budget import Claim

CLOSE = {"Connection": "close"}  # on a refusal before the body is read: neither read nor wait for the rest


async def read_body(
    request: Request, limit_bytes: int, claim: Claim | None = None, timeout_s: float | None = None
) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit_bytes` (declared or streamed).

    With a `claim`, the declared length is claimed before a byte is read and a chunked body as it
    arrives (Overloaded when the budget has no room); a body not in within `timeout_s` gets 408.
    Refusals close the connection, so the rest of the body is neither read nor waited for.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise HTTPException(413, f"body of {int(declared)} bytes exceeds the limit of {limit_bytes} bytes", CLOSE)
    if claim is not None and declared is not None and declared.isdigit():
        claim.cover(int(declared))
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit_bytes:
                    raise HTTPException(413, f"body exceeds the limit of {limit_bytes} bytes", CLOSE)
                if claim is not None:
                    claim.cover(size)
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPException(408, f"request body not received within {timeout_s:g} s", CLOSE) from None
    return b"".join(chunks)


async def image_bytes(request: Request, limit_bytes: int, claim: Claim, timeout_s: float) -> tuple[bytes, str | None]:
    """The encoded image and its file name: the raw body (name from the `file` query parameter), or the one
    file part of a multipart/form-data body (its filename)."""
    body = await read_body(request, limit_bytes, claim, timeout_s)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body, request.query_params.get("file")

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
        return await files[0].read(), files[0].filename
    finally:
        await form.close()


def png(array: np.ndarray) -> bytes:
    """`array` (uint8 or uint16, gray) encoded as PNG bytes."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"cannot encode a {array.dtype} {array.shape} array as PNG")
    return encoded.tobytes()


@dataclass(frozen=True)
class Png:
    """An encoded map or mask PNG, its (width, height) and, for a 16-bit map, the scores its pixels span."""

    data: bytes
    size: tuple[int, int]  # (width, height)
    range: tuple[float, float] | None = None  # a map's: score = range[0] + pixel / 65535 * (range[1] - range[0])

    def as_json(self) -> dict:
        """Inside the JSON answer, as base64 (the form before `Accept: image/png`, kept for existing clients)."""
        field = {"png_base64": base64.b64encode(self.data).decode("ascii"), "size": list(self.size)}
        return field if self.range is None else {**field, "range": list(self.range)}


def map_png(anomaly_map: np.ndarray) -> Png:
    """The anomaly map as a 16-bit gray PNG with the range that maps 0..65535 back to scores
    (the map's own range: normalized scores are not bounded, so no fixed range is lossless)."""
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    scaled = anomaly_map - low  # one map-sized buffer, the steps in place (float32, as the map)
    scaled /= max(high - low, 1e-12)
    scaled *= 65535
    return Png(png(np.round(scaled, out=scaled).astype(np.uint16)), anomaly_map.shape[::-1], (low, high))


def mask_png(mask: np.ndarray) -> Png:
    """The thresholded mask as an 8-bit PNG: 255 anomalous, 0 normal."""
    return Png(png(mask.astype(np.uint8) * 255), mask.shape[::-1])
