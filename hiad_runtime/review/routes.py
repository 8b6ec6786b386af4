"""The review page's routes, on the service itself (`serve --review-dir`).

GET / is the page and /static/* its script and style (shipped in the package, nothing from elsewhere: the
box is offline). They hold no data: everything shown comes from /v1/review/*, which asks for the bearer
token like every /v1/ route (the page asks for the token and sends it with each call):

    GET  /v1/review/items?filter=all|flagged|unlabeled&limit=N&before=ID   records and labels, newest first
    GET  /v1/review/items/ID                    one record and its label
    GET  /v1/review/items/ID/image|map|thumb    the image (as received; PNG for formats browsers lack),
                                                the 8-bit map PNG, the thumbnail JPEG
    POST /v1/review/items/ID/label              {"label": "good"|"defect", "who": ..., "note": ...}
    GET  /v1/review/summary?limit=N             recent scores with decisions and labels, thresholds, drift
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Protocol

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from hiad_runtime.image import ImageError, load_image
from hiad_runtime.review.drift import DriftMonitor
from hiad_runtime.review.keeper import ReviewKeeper
from hiad_runtime.review.store import LABEL_VALUES, Record, ReviewStore, ReviewStoreError
from hiad_runtime.serve.payload import read_body


class ReviewedService(Protocol):
    """What the review routes use of the service they are part of (hiad_runtime/serve/app.py's Service)."""

    settings: Any  # its ServiceSettings: the body timeout
    slot: Any  # its ModelSlot: the bundle served now
    drift: DriftMonitor
    keeper: ReviewKeeper | None

    def authorize(self, request: Request) -> None:
        """Raise 401 unless the request carries the service's token."""


STATIC = Path(__file__).parent / "static"
BROWSER_FORMATS = {".png", ".jpg", ".webp", ".bmp"}  # what a browser shows as is; others are sent as PNG
FILTERS = ("all", "flagged", "unlabeled")
MAX_LIMIT = 5000
MAX_NOTE, MAX_WHO = 2000, 100


def review_routes(service: ReviewedService) -> list[BaseRoute]:
    """The page and its API when the service keeps a review store, else none."""
    if service.keeper is None:
        return []
    api = ReviewApi(service)
    return [
        Route("/", api.page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/v1/review/items", api.items, methods=["GET"]),
        Route("/v1/review/items/{id}", api.item, methods=["GET"]),
        Route("/v1/review/items/{id}/image", api.image, methods=["GET"]),
        Route("/v1/review/items/{id}/map", api.map, methods=["GET"]),
        Route("/v1/review/items/{id}/thumb", api.thumb, methods=["GET"]),
        Route("/v1/review/items/{id}/label", api.label, methods=["POST"]),
        Route("/v1/review/summary", api.summary, methods=["GET"]),
    ]


class ReviewApi:
    """Handlers of the review routes, on the service's store, drift monitor and token rule."""

    def __init__(self, service: ReviewedService):
        self.service = service
        self.store: ReviewStore = service.keeper.store

    async def page(self, request: Request) -> Response:
        """GET /: the page (no data in it)."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def items(self, request: Request) -> JSONResponse:
        """GET /v1/review/items: the newest records (filtered), each with its latest label."""
        self.service.authorize(request)
        which = request.query_params.get("filter", "all")
        if which not in FILTERS:
            raise HTTPException(400, f"filter={which!r}: expected one of {', '.join(FILTERS)}")
        limit = _int_param(request, "limit", 100)
        before = request.query_params.get("before")
        items, total = await asyncio.to_thread(self.listing, which, limit, before)  # may read many records
        return JSONResponse({"items": items, "total": total})

    def listing(self, which: str, limit: int, before: str | None) -> tuple[list[dict], int]:
        """The newest `limit` records passing the filter (older than `before`), with labels; and how many are kept."""
        labels = self.store.labels()
        ids = self.store.ids()
        out = []
        for item_id in ids:
            if len(out) >= limit:
                break
            if before is not None and item_id >= before:
                continue
            record = self.store.item(item_id)
            if record is None or (which == "flagged" and record.decision != "flag"):
                continue
            if which == "unlabeled" and item_id in labels:
                continue
            out.append(_as_json(record, labels))
        return out, len(ids)

    async def item(self, request: Request) -> JSONResponse:
        """GET /v1/review/items/ID: one record and its latest label."""
        self.service.authorize(request)
        return JSONResponse(_as_json(self.record(request), self.store.labels()))

    async def image(self, request: Request) -> Response:
        """GET /v1/review/items/ID/image: the image as received, or as PNG when browsers cannot show its format."""
        self.service.authorize(request)
        record = self.record(request)
        if record.image_path.suffix in BROWSER_FORMATS:
            return FileResponse(record.image_path, headers={"Cache-Control": "private, max-age=86400"})
        try:
            data = await asyncio.to_thread(_as_png, record.image_path)
        except ImageError as e:
            raise HTTPException(500, str(e)) from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    async def map(self, request: Request) -> Response:
        """GET /v1/review/items/ID/map: the 8-bit map PNG (scores: record.map_range)."""
        return self.kept_file(request, "map_path", "map")

    async def thumb(self, request: Request) -> Response:
        """GET /v1/review/items/ID/thumb: the thumbnail JPEG."""
        return self.kept_file(request, "thumb_path", "thumbnail")

    def kept_file(self, request: Request, path_of: str, what: str) -> Response:
        """One of an item's kept files (`Record.<path_of>`), 404 naming `what` when it was not kept."""
        self.service.authorize(request)
        record = self.record(request)
        path = getattr(record, path_of)
        if path is None:
            raise HTTPException(404, f"{record.id}: no {what} kept")
        return FileResponse(path, headers={"Cache-Control": "private, max-age=86400"})

    async def label(self, request: Request) -> JSONResponse:
        """POST /v1/review/items/ID/label: append the operator's label (the latest wins; none is overwritten)."""
        self.service.authorize(request)
        record = self.record(request)
        try:
            body = json.loads(await read_body(request, 64 << 10, timeout_s=self.service.settings.body_timeout_s))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPException(400, f"label body: not JSON ({e})") from None
        if not isinstance(body, dict) or body.get("label") not in LABEL_VALUES:
            raise HTTPException(
                400, f'label body: expected {{"label": one of {", ".join(LABEL_VALUES)}, "who", "note"}}'
            )
        who, note = body.get("who") or "operator", body.get("note") or ""
        if not isinstance(who, str) or not isinstance(note, str) or len(who) > MAX_WHO or len(note) > MAX_NOTE:
            raise HTTPException(400, f"label body: 'who' (<= {MAX_WHO} chars) and 'note' (<= {MAX_NOTE}) are strings")
        try:
            label = await asyncio.to_thread(self.store.label, record.id, body["label"], who, note)
        except ReviewStoreError as e:
            raise HTTPException(400, str(e)) from None
        return JSONResponse(label.__dict__)

    async def summary(self, request: Request) -> JSONResponse:
        """GET /v1/review/summary: the newest scores (with decision and label), the thresholds in use, drift."""
        self.service.authorize(request)
        limit = _int_param(request, "limit", 1000)
        records = await asyncio.to_thread(self.store.items, limit)
        labels = self.store.labels()
        model = self.service.slot.current
        thresholds = {"image": None, "pixel": None}
        if model is not None:
            thresholds = {"image": model.inspector.image_threshold, "pixel": model.inspector.pixel_threshold}
        scores = [[r.score, r.decision, labels[r.id].label if r.id in labels else None] for r in records]
        answer = {
            "bundle_id": None if model is None else model.bundle_id,
            "thresholds": thresholds,
            "scores": scores,  # [score, decision, label], newest first
            "drift": self.service.drift.report().as_json(),
        }
        return JSONResponse(answer)

    def record(self, request: Request) -> Record:
        """The record the path names, or 404."""
        item_id = request.path_params["id"]
        record = self.store.item(item_id)
        if record is None:
            raise HTTPException(404, f"{item_id}: no such inspection in the review store")
        return record


def _as_json(record: Record, labels: dict) -> dict:
    label = labels.get(record.id)
    return record.to_json() | {"label": None if label is None else label.__dict__}


def _as_png(path: Path) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", cv2.cvtColor(load_image(path), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageError(f"{path}: cannot be re-encoded as PNG")
    return data.tobytes()


def _int_param(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name, str(default))
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise HTTPException(400, f"{name}={value!r}: expected an integer from 1 to {MAX_LIMIT}")
    return int(value)
