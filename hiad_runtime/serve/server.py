"""Run the service under uvicorn; SIGHUP reloads the bundle from disk like POST /v1/reload."""

from __future__ import annotations

import asyncio
import signal

import uvicorn

from hiad_runtime.bundle import BundleError
from hiad_runtime.review.store import ReviewStoreError
from hiad_runtime.serve.app import ServeSettings, create_app, log
from hiad_runtime.serve.connections import accept_backlog, connection_cap, guarded_protocol, open_file_limit
from hiad_runtime.serve.logs import rate_limit


def run(settings: ServeSettings, host: str, port: int) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop, 2 when the bundle could not be served at all."""
    file_limit = open_file_limit()
    try:
        max_connections = connection_cap(settings.max_connections, file_limit)
    except ValueError as e:
        log.error("%s", e)
        return 2
    failures: list[str] = []

    def stop(message: str) -> None:
        log.error(message)
        failures.append(message)
        server.should_exit = True

    try:
        app = create_app(settings, on_load_failure=stop)
    except ReviewStoreError as e:
        log.error("%s", e)
        return 2
    refused = lambda reason: app.metrics.connections_refused.labels(reason).inc()  # noqa: E731
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        http=guarded_protocol(max_connections, settings.header_timeout_s, refused),
        backlog=accept_backlog(file_limit, max_connections),
        timeout_graceful_shutdown=settings.timeout_s,
    )
    rate_limit("uvicorn.error", "asyncio")  # after uvicorn.Config: its logging set-up resets filters
    server = uvicorn.Server(config)

    async def reload_from_disk() -> None:
        try:
            await app.state.reload(None)
        except BundleError as e:
            log.error("SIGHUP reload refused, still serving the previous bundle: %s", e)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task] = set()  # held until done: the loop keeps only weak references

        def on_sighup() -> None:
            task = loop.create_task(reload_from_disk())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        await server.serve()

    asyncio.run(main())
    return 2 if failures else 0
