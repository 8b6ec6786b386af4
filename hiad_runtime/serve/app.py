"""The HTTP application: routes, bearer-token check, JSON errors, and the model's life cycle.

`Service` holds the state and one handler per route; `create_app` wraps it into a Starlette app.
POST /v1/inspect, GET /v1/model, POST /v1/reload (bearer token when configured); GET /healthz,
/readyz, /metrics (open, for probes and scrapers). The bundle loads in the background at start-up:
/healthz answers at once, /readyz once the bundle is verified and warmed up. The bundle's extracted
files (a .tar bundle) are removed when the server stops, and those of dead servers when one starts.
With `review`, every inspection is kept in a review store and the review page is served at /
(hiad_runtime.review.routes); the scores' drift is watched always (in /v1/model and /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Awaitable, Callable, NamedTuple

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hiad_runtime.bundle import EXTRACT_PREFIX, BundleError, remove_extractions
from hiad_runtime.files import remove_stale
from hiad_runtime.image import ImageError, decode
from hiad_runtime.inspector import Result
from hiad_runtime.options import RuntimeOptions
from hiad_runtime.review.drift import DriftMonitor
from hiad_runtime.review.keeper import Inspection, ReviewKeeper, ReviewSettings
from hiad_runtime.review.store import new_id, thumbnail_pixels
from hiad_runtime.serve.budget import BodyBudget, Claim
from hiad_runtime.serve.metrics import ServiceMetrics
from hiad_runtime.serve.model_slot import LoadedModel, ModelSlot
from hiad_runtime.serve.payload import CLOSE, Png, image_bytes, map_png, mask_png, read_body
from hiad_runtime.serve.pool import InferencePool, Overloaded

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines land with its own

PATHS = ("/v1/inspect", "/v1/model", "/v1/reload", "/healthz", "/readyz", "/metrics", "/", "/v1/review/items")
PATHS += ("/v1/review/summary",)


@dataclass(frozen=True)
class ServeSettings:
    """How `hiad-runtime serve` runs: the bundle, its runtime options, and the service's limits and timeouts.
    Values are checked on construction: a ValueError names every field out of range."""

    bundle: Path
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # how each bundle is run (as predict and bench)
    workers: int = 1  # inferences at once
    max_queue: int = 8  # requests waiting for a worker; one more is answered 503
    max_body_bytes: int = 64 << 20
    max_inflight_bytes: int = 256 << 20  # request bodies held in memory at once, all requests together
    timeout_s: float = 30.0  # per request once its body is in, queue wait included
    header_timeout_s: float = 10.0  # for a request's headers to arrive
    body_timeout_s: float = 30.0  # for a request's body to arrive
    max_connections: int | None = None  # open at once (None: from the open-file limit)
    token: str | None = None  # bearer token for /v1/*
    review: ReviewSettings | None = None  # keep inspections for review (--review-dir) and serve the page
    drift_window: int = 500  # recent scores compared with the bundle's normal-score law

    def __post_init__(self):
        limits = {
            "workers": self.workers >= 1,
            "max_queue": self.max_queue >= 0,
            "max_body_bytes": self.max_body_bytes > 0,
        }
        limits |= {"timeout_s": self.timeout_s > 0}
        limits |= {"header_timeout_s": self.header_timeout_s > 0, "body_timeout_s": self.body_timeout_s > 0}
        limits |= {"max_connections": self.max_connections is None or self.max_connections >= 1}
        limits |= {"max_inflight_bytes": self.max_inflight_bytes >= self.max_body_bytes}  # one largest body must fit
        wrong = [f"{name}={getattr(self, name)}" for name, ok in limits.items() if not ok]
        if wrong:
            below = " (below max_body_bytes)" if "max_inflight_bytes" in wrong[-1] else ""
            raise ValueError(f"serve settings out of range: {', '.join(wrong)}{below}")


class Service:
    """The service's state (the model slot, the inference pool, the body budget, the metrics) and one
    handler per route."""

    def __init__(
        self,
        settings: ServeSettings,
        on_load_failure: Callable[[str], None],
        after_reload: Callable[[LoadedModel], Awaitable[None]] | None = None,
    ):
        self.settings = settings
        self.on_load_failure = on_load_failure  # hears when the bundle given at start-up cannot be served
        self.after_reload = after_reload  # after a reload over HTTP: the replicated service rolls it out to all
        self.loading: asyncio.Task | None = None  # the start-up load, once the app has started
        self.slot = ModelSlot(settings.runtime)
        self.pool = InferencePool(settings.workers, settings.max_queue)
        self.budget = BodyBudget(settings.max_inflight_bytes, self.pool.retry_after_s)
        self.metrics = ServiceMetrics(self.pool, self.budget)
        self.load_error: str | None = None
        self.drift = DriftMonitor(settings.drift_window)
        self.keeper = ReviewKeeper(settings.review) if settings.review is not None else None
        self.metrics.watch_drift(self.drift)
        if self.keeper is not None:
            self.metrics.watch_review(self.keeper)

    def routes(self) -> list[Route]:
        """The service's routes, one handler each (see the module docstring); the review page's with `review`."""
        from hiad_runtime.review.routes import review_routes

        return review_routes(self) + [
            Route("/v1/inspect", self.inspect, methods=["POST"]),
            Route("/v1/model", self.model_summary, methods=["GET"]),
            Route("/v1/reload", self.reload_route, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_route, methods=["GET"]),
        ]

    def authorize(self, request: Request) -> None:
        """Refuse the request with 401 unless it carries the configured bearer token (no token: everyone passes)."""
        token = self.settings.token
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def serving(self) -> LoadedModel:
        """The model in service, leased: release it when the request is done."""
        model = self.slot.lease()
        if model is None:
            raise HTTPException(503, "no bundle in service: loading, or stopping", headers={"Retry-After": "5"})
        return model

    async def reload(self, path: str | None) -> LoadedModel:
        """Load, verify, warm up, then switch; BundleError leaves the current model serving."""
        try:
            model = await asyncio.to_thread(self.slot.reload, path)
        except BundleError:
            self.metrics.reloads.labels("refused").inc()
            raise
        self.metrics.reloads.labels("done").inc()
        self.metrics.set_model(model.bundle_id, str(model.source))
        kept = await asyncio.to_thread(self.keeper.store.items, self.drift.window) if self.keeper is not None else []
        recent = [r.score for r in reversed(kept) if r.bundle == model.bundle_id]  # the window survives a restart
        self.drift.use_bundle(model.bundle_id, model.inspector.manifest.thresholds, recent)
        log.info("serving bundle %s from %s (%s)", model.bundle_id, model.source, model.path)
        return model

    async def inspect(self, request: Request) -> Response:
        """POST /v1/inspect: score the body's image; JSON, or one PNG (map or mask) for Accept: image/png."""
        started = time.perf_counter()
        self.authorize(request)
        want_map, want_mask = (_png_option(request, name) for name in ("map", "mask"))
        as_png = _prefers_png(request.headers.get("accept", ""))
        if as_png and want_map and want_mask:
            raise HTTPException(400, "Accept: image/png answers one PNG: map=png or mask=png (both come in JSON)")
        want_map |= as_png and not want_mask
        model = self.serving()  # kept to the end: a reload meanwhile does not affect this request
        try:
            with self.budget.claim() as claim:
                return await self.inspect_with(request, model, claim, want_map, want_mask, as_png, started)
        finally:
            model.release()

    async def inspect_with(
        self,
        request: Request,
        model: LoadedModel,
        claim: Claim,
        want_map: bool,
        want_mask: bool,
        as_png: bool,
        started: float,
    ) -> Response:
        """`inspect` once the model is leased and the body budget claimed: read the body, infer on the pool, answer.
        Overload is 503 with Retry-After, a late answer 504, an unreadable image 400."""
        settings = self.settings
        if want_mask and model.inspector.pixel_threshold is None:
            raise HTTPException(400, "mask=png: this bundle has no pixel threshold")
        try:
            data, file = await image_bytes(request, settings.max_body_bytes, claim, settings.body_timeout_s)
        except Overloaded as e:
            raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after_s), **CLOSE}) from None
        try:
            job = partial(infer, model, data, want_map, want_mask, self.keeper is not None)
            done, queued_s = await self.pool.run(job, settings.timeout_s)
        except Overloaded as e:
            raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within the {settings.timeout_s:g} s request timeout") from None
        except ImageError as e:
            raise HTTPException(400, str(e)) from None
        answer, images = done.answer, done.images
        total = time.perf_counter() - started
        answer["latency_ms"].update(queue=round(queued_s * 1000, 3), total=round(total * 1000, 3))
        self.metrics.latency.observe(total)
        self.metrics.image_done()
        self.drift.observe(model.bundle_id, answer["score"])
        if self.keeper is not None:
            answer["review_id"] = self.keep(data, file, done, model)
        if as_png:
            return png_answer(answer, images.get("map") or images["mask"])
        answer |= {name: image.as_json() for name, image in images.items()}
        return JSONResponse(answer, headers={"Vary": "Accept"})

    def keep(self, data: bytes, file: str | None, done: "Inferred", model: LoadedModel) -> str | None:
        """Hand the inspection to the review store's writer; its id, or None when it is not kept (counted)."""
        answer, result = done.answer, done.result
        now = dt.datetime.now(dt.timezone.utc)
        item_id = new_id(now)
        fields = dict(
            score=answer["score"],
            decision=answer["decision"],
            threshold=model.inspector.image_threshold,
            bundle=model.bundle_id,
            latency_ms=answer["latency_ms"]["total"],
            width=result.input_size[0],
            height=result.input_size[1],
            file=file,
            pixel_threshold=model.inspector.pixel_threshold,
            now=now,
            item_id=item_id,
        )
        return item_id if self.keeper.submit(Inspection(data, result.anomaly_map, done.thumb, fields)) else None

    async def model_summary(self, request: Request) -> JSONResponse:
        """GET /v1/model: the model in service, summarized."""
        self.authorize(request)
        model = self.serving()
        try:
            return JSONResponse(summary(model) | {"drift": self.drift.report().as_json()})
        finally:
            model.release()

    async def reload_route(self, request: Request) -> JSONResponse:
        """POST /v1/reload: load the bundle at the body's `bundle` path (default: the served bundle's path, resolved
        anew), then switch; a refused bundle is 422 and the previous one keeps serving."""
        self.authorize(request)
        body = await read_body(request, 64 << 10, timeout_s=self.settings.body_timeout_s)
        path = None
        if body.strip():
            try:
                path = _json_object(body).get("bundle")
            except ValueError as e:
                raise HTTPException(400, f"reload body: {e}") from None
            if path is not None and not isinstance(path, str):
                raise HTTPException(400, "reload body: 'bundle' must be a path string")
        current = self.serving()  # 503 while no bundle is loaded yet
        previous = current.bundle_id
        current.release()
        try:
            model = await self.reload(path)
        except BundleError as e:
            return JSONResponse({"error": f"bundle refused, still serving {previous}: {e}", "bundle_id": previous}, 422)
        if self.after_reload is not None:
            await self.after_reload(model)
        answer = {
            "bundle_id": model.bundle_id,
            "path": str(model.source),
            "resolved": str(model.path),
            "previous": previous,
        }
        return JSONResponse(answer)

    async def healthz(self, request: Request) -> JSONResponse:
        """GET /healthz: the process answers."""
        return JSONResponse({"alive": True})

    async def readyz(self, request: Request) -> JSONResponse:
        """GET /readyz: 200 once a bundle is loaded and serving, else 503 with why not."""
        model = self.slot.current
        if model is None:
            return JSONResponse({"ready": False, "error": self.load_error or "loading the bundle"}, 503)
        return JSONResponse({"ready": True, "bundle_id": model.bundle_id})

    async def metrics_route(self, request: Request) -> Response:
        """GET /metrics: the Prometheus text exposition."""
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def asgi_app(self) -> "CountedApp":
        """The service's routes as one ASGI application, every answer counted in the metrics."""
        app = Starlette(
            routes=self.routes(),
            exception_handlers={HTTPException: _json_error, Exception: _internal_error},
            lifespan=self.lifespan,
        )
        app.state.reload = self.reload
        return CountedApp(app, self.metrics)

    async def first_load(self) -> None:
        """Load the start-up bundle; a refused one is kept as /readyz's error and reported to `on_load_failure`."""
        try:
            await self.reload(str(self.settings.bundle))
        except BundleError as e:
            self.load_error = str(e)
            self.on_load_failure(f"cannot serve {self.settings.bundle}: {e}")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        """Starlette lifespan: clear dead servers' extractions, load the bundle in the background; at stop,
        finish the running inferences, release the model and remove this server's extractions."""
        remove_stale(Path(tempfile.gettempdir()), EXTRACT_PREFIX)  # bundles extracted by servers that were killed
        self.loading = asyncio.create_task(self.first_load())
        yield
        self.loading.cancel()
        self.pool.shutdown()  # waits for the inferences running
        if self.keeper is not None:
            self.keeper.close()  # writes what is queued
        self.slot.close()
        remove_extractions()  # uvicorn ends a SIGTERM/SIGINT stop by re-raising the signal: no atexit


class Inferred(NamedTuple):
    """What a request's inference hands back to the event loop."""

    answer: dict
    images: dict[str, Png]  # the PNGs asked for
    result: Result
    thumb: np.ndarray | None  # a small copy of the image, for the review store's list


def infer(model: LoadedModel, data: bytes, want_map: bool, want_mask: bool, keep: bool = False) -> Inferred:
    """One request's inference, on a pool worker: decode the body, predict; the answer, its PNGs, the result
    and, to `keep` it for review, a thumbnail (made here from the decoded pixels: decoding again costs seconds
    at 8K)."""
    if not model.acquire():  # only after this request was answered 504 and the model replaced
        raise RuntimeError("the model was replaced meanwhile")
    try:
        inspector = model.inspector
        t0 = time.perf_counter()
        image = decode(data, "request body", inspector.max_pixels)
        decoded = time.perf_counter() - t0
        result = inspector.predict(image)
        seconds = {**result.timings, "decode": decoded + result.timings.get("decode", 0.0)}
        answer = {
            "score": float(result.score),
            "decision": result.decision,
            "bundle_id": model.bundle_id,
            "input_size": list(result.input_size),
            "latency_ms": {s: round(seconds.get(s, 0.0) * 1000, 3) for s in inspector.stages},
        }
        images = {}
        if want_map:
            images["map"] = map_png(result.anomaly_map)
        if want_mask:
            images["mask"] = mask_png(result.mask)
        return Inferred(answer, images, result, thumbnail_pixels(image) if keep else None)
    finally:
        model.release()


def create_app(settings: ServeSettings, on_load_failure: Callable[[str], None] = log.error) -> "CountedApp":
    """The service as an ASGI application; `on_load_failure` hears when the bundle given at start-up cannot be
    served."""
    return Service(settings, on_load_failure).asgi_app()


def png_answer(answer: dict, image: Png) -> Response:
    """The `Accept: image/png` form: the one PNG as the body, the rest of the answer in headers."""
    headers = {
        "X-Hiad-Score": repr(answer["score"]),
        "X-Hiad-Decision": json.dumps(answer["decision"]),
        "X-Hiad-Bundle-Id": answer["bundle_id"],
        "X-Hiad-Input-Size": "x".join(map(str, answer["input_size"])),
        "X-Hiad-Latency-Ms": json.dumps(answer["latency_ms"], separators=(",", ":")),
        "Vary": "Accept",
    }
    if image.range is not None:
        headers["X-Hiad-Map-Range"] = " ".join(repr(v) for v in image.range)
    return Response(image.data, media_type="image/png", headers=headers)


def summary(model: LoadedModel) -> dict:
    """GET /v1/model: what a line engineer checks before trusting the answers."""
    inspector, manifest = model.inspector, model.inspector.manifest.to_dict()
    tiling = inspector.tiling
    return {
        "bundle_id": model.bundle_id,
        "path": str(model.source),
        "resolved": str(model.path),  # the published version (or extraction) behind `path`
        "created": model.created,
        "producer": manifest.get("producer"),
        "tiling": {
            "image_size": list(tiling.image_size),
            "patch_size": list(tiling.patch_size),
            "tiles": len(tiling.tiles),
            "ds_factors": list(tiling.ds_factors),
        },
        "detector": manifest.get("detector") or sorted({t["head"]["kind"] for t in manifest["tasks"]}),
        "tasks": [
            {"name": t["name"], "tiles": len(t["tiles"]), "head": t["head"]["kind"]} for t in manifest["tasks"]
        ],  # tiles: 0 when routed
        "routing": manifest.get("routing") is not None,
        "thumbnail": manifest.get("thumbnail") is not None,
        "thresholds": manifest.get("thresholds"),
        "parity": manifest.get("parity"),
        "lineage": manifest.get("lineage"),  # each `hiad-train update` since the export: parent, images added, date
        "providers_in_use": inspector.providers_in_use,
    }


def _prefers_png(accept: str) -> bool:
    """Whether an Accept header ranks image/png above application/json (wildcards favour neither: JSON stays
    the default)."""
    quality = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            quality[media.lower()] = float(q)
        except ValueError:
            quality[media.lower()] = 0.0
    png_q = quality.get("image/png", 0.0)
    return png_q > 0 and png_q > quality.get("application/json", 0.0)


def _png_option(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value not in (None, "png"):
        raise HTTPException(400, f"{name}={value!r}: the only format offered is 'png'")
    return value == "png"


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError('expected a JSON object such as {"bundle": "/path/to/bundle"}')
    return value


def _path_label(path: str) -> str:
    """The metrics label of a path: itself for the known ones, one label per review route with an id in it."""
    if path in PATHS:
        return path
    if path.startswith("/static/"):
        return "/static/*"
    head, _, rest = path.removeprefix("/v1/review/items/").partition("/")
    if path.startswith("/v1/review/items/") and head and rest in ("", "image", "map", "thumb", "label"):
        return "/v1/review/items/{id}" + (f"/{rest}" if rest else "")
    return "other"


async def _json_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything unforeseen: a JSON 500 for this request (uvicorn logs the traceback), then on."""
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server keeps serving"}, 500)


class CountedApp:
    """The application wrapped to count every answer, 500s included, by path and status.

    Unknown paths share one label so that a scan of random URLs cannot grow the metrics."""

    def __init__(self, app: Starlette, metrics: ServiceMetrics):
        self.app, self.metrics, self.state = app, metrics, app.state

    async def __call__(self, scope, receive, send):
        """ASGI: pass everything to the app, counting each HTTP response by path and status."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _path_label(scope["path"])

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
