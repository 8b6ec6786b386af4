"""The HTTP application: routes, bearer-token check, JSON errors, and the model's life cycle.

POST /v1/inspect, GET /v1/model, POST /v1/reload (bearer token when configured); GET /healthz,
/readyz, /metrics (open, for probes and scrapers). The bundle loads in the background at start-up:
/healthz answers at once, /readyz once the bundle is verified and warmed up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hiad_runtime.bundle import BundleError
from hiad_runtime.image import ImageError, decode
from hiad_runtime.inspector import STAGES
from hiad_runtime.serve.metrics import ServiceMetrics
from hiad_runtime.serve.model_slot import LoadedModel, ModelSlot
from hiad_runtime.serve.payload import image_bytes, map_png, mask_png, read_body
from hiad_runtime.serve.pool import InferencePool, Overloaded

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines land with its own

PATHS = ("/v1/inspect", "/v1/model", "/v1/reload", "/healthz", "/readyz", "/metrics")


@dataclass(frozen=True)
class ServeSettings:
    bundle: Path
    workers: int = 1  # inferences at once
    max_queue: int = 8  # requests waiting for a worker; one more is answered 503
    max_body_bytes: int = 64 << 20
    max_pixels: int = 100_000_000  # declared width x height; checked before decoding
    timeout_s: float = 30.0  # per request, queue wait included
    token: str | None = None  # bearer token for /v1/*
    threads: int = 0  # ONNX Runtime intra-op threads per inference (0 = ORT's default)

    def __post_init__(self):
        limits = {"workers": self.workers >= 1, "max_queue": self.max_queue >= 0, "max_body_bytes": self.max_body_bytes > 0}
        limits |= {"max_pixels": self.max_pixels > 0, "timeout_s": self.timeout_s > 0, "threads": self.threads >= 0}
        wrong = [f"{name}={getattr(self, name)}" for name, ok in limits.items() if not ok]
        if wrong:
            raise ValueError(f"serve settings out of range: {', '.join(wrong)}")


def create_app(settings: ServeSettings, on_load_failure: Callable[[str], None] = log.error) -> "CountedApp":
    """The service; `on_load_failure` hears when the bundle given at start-up cannot be served."""
    slot = ModelSlot(threads=settings.threads)
    pool = InferencePool(settings.workers, settings.max_queue)
    metrics = ServiceMetrics(pool)
    state = {"load_error": None}

    def authorize(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def serving() -> LoadedModel:
        model = slot.current
        if model is None:
            raise HTTPException(503, "the bundle is still loading", headers={"Retry-After": "5"})
        return model

    async def reload(path: str | None) -> LoadedModel:
        """Load, verify, warm up, then switch; BundleError leaves the current model serving."""
        try:
            model = await asyncio.to_thread(slot.reload, path)
        except BundleError:
            metrics.reloads.labels("refused").inc()
            raise
        metrics.reloads.labels("done").inc()
        metrics.set_model(model.bundle_id, str(model.path))
        log.info("serving bundle %s from %s", model.bundle_id, model.path)
        return model

    async def inspect(request: Request) -> JSONResponse:
        started = time.perf_counter()
        authorize(request)
        want_map, want_mask = (_png_option(request, name) for name in ("map", "mask"))
        model = serving()  # kept to the end: a reload meanwhile does not affect this request
        if want_mask and (model.inspector.manifest.thresholds or {}).get("pixel") is None:
            raise HTTPException(400, "mask=png: this bundle has no pixel threshold")
        data = await image_bytes(request, settings.max_body_bytes)

        def job() -> dict:
            t0 = time.perf_counter()
            image = decode(data, "request body", settings.max_pixels)
            decoded = time.perf_counter() - t0
            result = model.inspector.predict(image)
            seconds = {**result.timings, "decode": decoded + result.timings.get("decode", 0.0)}
            answer = {
                "score": float(result.score),
                "decision": result.decision,
                "bundle_id": model.bundle_id,
                "input_size": list(result.input_size),
                "latency_ms": {s: round(seconds.get(s, 0.0) * 1000, 3) for s in STAGES},
            }
            if want_map:
                answer["map"] = map_png(result.anomaly_map)
            if want_mask:
                answer["mask"] = mask_png(result.mask)
            return answer

        try:
            answer, queued_s = await pool.run(job, settings.timeout_s)
        except Overloaded as e:
            raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within the {settings.timeout_s:g} s request timeout") from None
        except ImageError as e:
            raise HTTPException(400, str(e)) from None
        total = time.perf_counter() - started
        answer["latency_ms"].update(queue=round(queued_s * 1000, 3), total=round(total * 1000, 3))
        metrics.latency.observe(total)
        metrics.image_done()
        return JSONResponse(answer)

    async def model_summary(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(summary(serving()))

    async def reload_route(request: Request) -> JSONResponse:
        authorize(request)
        body = await read_body(request, 64 << 10)
        path = None
        if body.strip():
            try:
                path = _json_object(body).get("bundle")
            except ValueError as e:
                raise HTTPException(400, f"reload body: {e}") from None
            if path is not None and not isinstance(path, str):
                raise HTTPException(400, "reload body: 'bundle' must be a path string")
        previous = serving().bundle_id
        try:
            model = await reload(path)
        except BundleError as e:
            return JSONResponse({"error": f"bundle refused, still serving {previous}: {e}", "bundle_id": previous}, 422)
        return JSONResponse({"bundle_id": model.bundle_id, "path": str(model.path), "previous": previous})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"alive": True})

    async def readyz(request: Request) -> JSONResponse:
        model = slot.current
        if model is None:
            return JSONResponse({"ready": False, "error": state["load_error"] or "loading the bundle"}, 503)
        return JSONResponse({"ready": True, "bundle_id": model.bundle_id})

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        async def first_load() -> None:
            try:
                await reload(str(settings.bundle))
            except BundleError as e:
                state["load_error"] = str(e)
                on_load_failure(f"cannot serve {settings.bundle}: {e}")

        loading = asyncio.create_task(first_load())
        yield
        loading.cancel()
        pool.shutdown()

    app = Starlette(
        routes=[
            Route("/v1/inspect", inspect, methods=["POST"]),
            Route("/v1/model", model_summary, methods=["GET"]),
            Route("/v1/reload", reload_route, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _json_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.reload = reload
    return CountedApp(app, metrics)


def summary(model: LoadedModel) -> dict:
    """GET /v1/model: what a line engineer checks before trusting the answers."""
    inspector, manifest = model.inspector, model.inspector.manifest.to_dict()
    tiling = inspector.tiling
    return {
        "bundle_id": model.bundle_id,
        "path": str(model.path),
        "created": model.created,
        "producer": manifest.get("producer"),
        "tiling": {
            "image_size": list(tiling.image_size),
            "patch_size": list(tiling.patch_size),
            "tiles": len(tiling.tiles),
            "ds_factors": list(tiling.ds_factors),
        },
        "detector": manifest.get("detector") or sorted({t["head"]["kind"] for t in manifest["tasks"]}),
        "tasks": [{"name": t["name"], "tiles": len(t["tiles"]), "head": t["head"]["kind"]} for t in manifest["tasks"]],  # tiles: 0 when routed
        "routing": manifest.get("routing") is not None,
        "thumbnail": manifest.get("thumbnail") is not None,
        "thresholds": manifest.get("thresholds"),
        "parity": manifest.get("parity"),
        "providers_in_use": inspector.providers_in_use,
    }


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
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in PATHS else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
