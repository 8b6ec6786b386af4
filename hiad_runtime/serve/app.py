"""The HTTP application: routes, bearer-token check, JSON errors, and the model's life cycle.

POST /v1/inspect, GET /v1/model, POST /v1/reload (bearer token when configured); GET /healthz,
/readyz, /metrics (open, for probes and scrapers). The bundle loads in the background at start-up:
/healthz answers at once, /readyz once the bundle is verified and warmed up. The bundle's extracted
files (a .tar bundle) are removed when the server stops, and those of dead servers when one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hiad_runtime.bundle import EXTRACT_PREFIX, BundleError, remove_extractions
from hiad_runtime.files import remove_stale
from hiad_runtime.image import ImageError, decode
from hiad_runtime.inspector import STAGES
from hiad_runtime.serve.budget import BodyBudget, Claim
from hiad_runtime.serve.metrics import ServiceMetrics
from hiad_runtime.serve.model_slot import LoadedModel, ModelSlot
from hiad_runtime.serve.payload import CLOSE, Png, image_bytes, map_png, mask_png, read_body
from hiad_runtime.serve.pool import InferencePool, Overloaded

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines land with its own

PATHS = ("/v1/inspect", "/v1/model", "/v1/reload", "/healthz", "/readyz", "/metrics")


@dataclass(frozen=True)
class ServeSettings:
    bundle: Path
    workers: int = 1  # inferences at once
    max_queue: int = 8  # requests waiting for a worker; one more is answered 503
    max_body_bytes: int = 64 << 20
    max_inflight_bytes: int = 256 << 20  # request bodies held in memory at once, all requests together
    max_pixels: int | None = None  # declared width x height, checked before decoding (None: the Inspector's rule)
    timeout_s: float = 30.0  # per request once its body is in, queue wait included
    header_timeout_s: float = 10.0  # for a request's headers to arrive
    body_timeout_s: float = 30.0  # for a request's body to arrive
    max_connections: int | None = None  # open at once (None: from the open-file limit)
    token: str | None = None  # bearer token for /v1/*
    threads: int = 0  # ONNX Runtime intra-op threads per inference (0 = ORT's default)

    def __post_init__(self):
        limits = {"workers": self.workers >= 1, "max_queue": self.max_queue >= 0, "max_body_bytes": self.max_body_bytes > 0}
        limits |= {"max_pixels": self.max_pixels is None or self.max_pixels > 0, "timeout_s": self.timeout_s > 0}
        limits |= {"header_timeout_s": self.header_timeout_s > 0, "body_timeout_s": self.body_timeout_s > 0}
        limits |= {"threads": self.threads >= 0}
        limits |= {"max_connections": self.max_connections is None or self.max_connections >= 1}
        limits |= {"max_inflight_bytes": self.max_inflight_bytes >= self.max_body_bytes}  # one largest body must fit
        wrong = [f"{name}={getattr(self, name)}" for name, ok in limits.items() if not ok]
        if wrong:
            below = " (below max_body_bytes)" if "max_inflight_bytes" in wrong[-1] else ""
            raise ValueError(f"serve settings out of range: {', '.join(wrong)}{below}")


def create_app(settings: ServeSettings, on_load_failure: Callable[[str], None] = log.error) -> "CountedApp":
    """The service; `on_load_failure` hears when the bundle given at start-up cannot be served."""
    slot = ModelSlot(threads=settings.threads, max_pixels=settings.max_pixels)
    pool = InferencePool(settings.workers, settings.max_queue)
    budget = BodyBudget(settings.max_inflight_bytes, pool.retry_after_s)
    metrics = ServiceMetrics(pool, budget)
    state = {"load_error": None}

    def authorize(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def serving() -> LoadedModel:
        """The model in service, leased: release it when the request is done."""
        model = slot.lease()
        if model is None:
            raise HTTPException(503, "no bundle in service: loading, or stopping", headers={"Retry-After": "5"})
        return model

    async def reload(path: str | None) -> LoadedModel:
        """Load, verify, warm up, then switch; BundleError leaves the current model serving."""
        try:
            model = await asyncio.to_thread(slot.reload, path)
        except BundleError:
            metrics.reloads.labels("refused").inc()
            raise
        metrics.reloads.labels("done").inc()
        metrics.set_model(model.bundle_id, str(model.source))
        log.info("serving bundle %s from %s (%s)", model.bundle_id, model.source, model.path)
        return model

    async def inspect(request: Request) -> Response:
        started = time.perf_counter()
        authorize(request)
        want_map, want_mask = (_png_option(request, name) for name in ("map", "mask"))
        as_png = _prefers_png(request.headers.get("accept", ""))
        if as_png and want_map and want_mask:
            raise HTTPException(400, "Accept: image/png answers one PNG: map=png or mask=png (both come in JSON)")
        want_map |= as_png and not want_mask
        model = serving()  # kept to the end: a reload meanwhile does not affect this request
        try:
            with budget.claim() as claim:
                return await inspect_with(request, model, claim, want_map, want_mask, as_png, started)
        finally:
            model.release()

    async def inspect_with(
        request: Request, model: LoadedModel, claim: Claim, want_map: bool, want_mask: bool, as_png: bool,
        started: float,
    ) -> Response:
        if want_mask and model.inspector.pixel_threshold is None:
            raise HTTPException(400, "mask=png: this bundle has no pixel threshold")
        try:
            data = await image_bytes(request, settings.max_body_bytes, claim, settings.body_timeout_s)
        except Overloaded as e:
            raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after_s), **CLOSE}) from None

        def job() -> tuple[dict, dict[str, Png]]:
            if not model.acquire():  # only after this request was answered 504 and the model replaced
                raise RuntimeError("the model was replaced meanwhile")
            try:
                t0 = time.perf_counter()
                image = decode(data, "request body", model.inspector.max_pixels)
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
                images = {}
                if want_map:
                    images["map"] = map_png(result.anomaly_map)
                if want_mask:
                    images["mask"] = mask_png(result.mask)
                return answer, images
            finally:
                model.release()

        try:
            (answer, images), queued_s = await pool.run(job, settings.timeout_s)
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
        if as_png:
            return png_answer(answer, images.get("map") or images["mask"])
        answer |= {name: image.as_json() for name, image in images.items()}
        return JSONResponse(answer, headers={"Vary": "Accept"})

    async def model_summary(request: Request) -> JSONResponse:
        authorize(request)
        model = serving()
        try:
            return JSONResponse(summary(model))
        finally:
            model.release()

    async def reload_route(request: Request) -> JSONResponse:
        authorize(request)
        body = await read_body(request, 64 << 10, timeout_s=settings.body_timeout_s)
        path = None
        if body.strip():
            try:
                path = _json_object(body).get("bundle")
            except ValueError as e:
                raise HTTPException(400, f"reload body: {e}") from None
            if path is not None and not isinstance(path, str):
                raise HTTPException(400, "reload body: 'bundle' must be a path string")
        current = serving()  # 503 while no bundle is loaded yet
        previous = current.bundle_id
        current.release()
        try:
            model = await reload(path)
        except BundleError as e:
            return JSONResponse({"error": f"bundle refused, still serving {previous}: {e}", "bundle_id": previous}, 422)
        answer = {"bundle_id": model.bundle_id, "path": str(model.source), "resolved": str(model.path), "previous": previous}
        return JSONResponse(answer)

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
        remove_stale(Path(tempfile.gettempdir()), EXTRACT_PREFIX)  # bundles extracted by servers that were killed

        async def first_load() -> None:
            try:
                await reload(str(settings.bundle))
            except BundleError as e:
                state["load_error"] = str(e)
                on_load_failure(f"cannot serve {settings.bundle}: {e}")

        loading = asyncio.create_task(first_load())
        yield
        loading.cancel()
        pool.shutdown()  # waits for the inferences running
        slot.close()
        remove_extractions()  # uvicorn ends a SIGTERM/SIGINT stop by re-raising the signal: no atexit

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
        "tasks": [{"name": t["name"], "tiles": len(t["tiles"]), "head": t["head"]["kind"]} for t in manifest["tasks"]],  # tiles: 0 when routed
        "routing": manifest.get("routing") is not None,
        "thumbnail": manifest.get("thumbnail") is not None,
        "thresholds": manifest.get("thresholds"),
        "parity": manifest.get("parity"),
        "providers_in_use": inspector.providers_in_use,
    }


def _prefers_png(accept: str) -> bool:
    """Whether an Accept header ranks image/png above application/json (wildcards favour neither: JSON stays default)."""
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
