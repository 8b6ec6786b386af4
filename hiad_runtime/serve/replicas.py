"""`hiad-runtime serve BUNDLE --ray-replicas N` (extra `[ray]`): the service as a Ray Serve deployment.

Each replica runs the very application `hiad-runtime serve` runs (app.py: routes, bearer token, body and
pixel limits, its own inference pool and queue, metrics) as a Ray Serve ingress, so the API and its limits
are one code path. Ray's HTTP proxy spreads requests over the replicas by their requests in progress; a
replica accepts its pool's workers + queue and `PROBES` more, so a full replica answers from its own pool
(503 "queue full" + Retry-After) and probes still get through. Requests that find every replica at that
limit wait at the proxy, at most `--max-queue` of them; more are answered 503 + Retry-After by Ray.

A reload (POST /v1/reload to any replica, or SIGHUP to this process) is rolled out by the `Rollout` actor:
the replica that got the request loads, verifies and warms up the bundle first (a refused one is 422 and
nothing changes anywhere), then the deployment is redeployed with a new `user_config`, which Ray applies
to one replica at a time (`reconfigure`): each keeps answering with its current model while it loads the
new one, then swaps (model_slot.py). A replica started later (autoscaling, a restart) loads the bundle of
the latest rollout before it takes a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import signal
import time
from dataclasses import dataclass

from hiad_runtime.bundle import BundleError
from hiad_runtime.serve.app import ServeSettings, Service, log
from hiad_runtime.serve.model_slot import LoadedModel

APP = "hiad"  # the Serve application's name
ROLLOUT = "hiad-rollout"  # the named actor that deploys and rolls out
NAMESPACE = "serve"  # Serve's own namespace, where replicas look the rollout actor up
PROBES = 2  # requests a replica takes beyond its pool: /healthz, /readyz, /metrics and reloads while it is full
# Serve's 5 s readiness and 10 s health checks of its HTTP proxy fail on a small, loaded machine (the proxy
# imports its web stack): it is then killed and started again, in a loop. Longer ones for a local instance.
SLOW_START_S = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": 120, "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": 60}
PROXY_RETRY_AFTER_S = 1  # Retry-After of Ray's own 503 (the proxy's queue full): it cannot know the pace


@dataclass(frozen=True)
class ReplicaScale:
    """How many replicas, each reserving how many CPUs, and where Ray runs."""

    replicas: int  # started with, and the autoscaler's lower bound
    max_replicas: int  # the autoscaler's upper bound; == replicas: a fixed count
    cpus: float  # reserved per replica (workers x threads)
    address: str = "local"  # 'local', 'auto' or a cluster address, as predict --ray

    def __post_init__(self):
        if not 1 <= self.replicas <= self.max_replicas or self.cpus <= 0:
            raise ValueError(
                f"replicas out of range: --ray-replicas {self.replicas} must be >= 1 and <= --max-replicas "
                f"{self.max_replicas}, CPUs per replica {self.cpus:g} > 0"
            )


class Replica:
    """One Ray Serve replica: the service's app (see the module docstring), its bundle set by `reconfigure`."""

    def __init__(self, settings: ServeSettings):
        self.service = Service(settings, on_load_failure=log.error, after_reload=self.roll_out)
        self.configured = False  # the first reconfigure (before any request) is done

    def __serve_build_asgi_app__(self):
        return self.service.asgi_app()

    async def reconfigure(self, config: dict) -> None:
        """Ray calls it before the replica takes a request, then once per rollout (one replica at a time):
        serve `config['bundle']` unless this replica serves `config['bundle_id']` already (no id: unless it just
        started from that path). A start-up bundle that cannot be served fails the replica's start; a refused
        rollout keeps the current model. `config['generation']` only makes every rollout a new config."""
        service = self.service
        await asyncio.shield(service.loading)  # the start-up load (lifespan), from the path given at start
        current = service.slot.current
        if current is None:
            raise RuntimeError(service.load_error or "the bundle could not be loaded")
        starting, self.configured = not self.configured, True
        if config["bundle_id"] is not None:
            serving = config["bundle_id"] == current.bundle_id  # e.g. the replica that got the reload request
        else:
            serving = starting and config["bundle"] == str(current.source)  # just read from that path
        if serving:
            return
        try:
            await service.reload(config["bundle"])
        except BundleError as e:
            log.error("rollout refused on this replica, still serving %s: %s", current.bundle_id, e)

    async def roll_out(self, model: LoadedModel) -> None:
        """After this replica reloaded over HTTP: the same bundle on every replica, one at a time."""
        import ray

        rollout = ray.get_actor(ROLLOUT, namespace=NAMESPACE)
        await rollout.deploy.remote(str(model.source), model.bundle_id)


def application(settings: ServeSettings, scale: ReplicaScale, user_config: dict):
    """The Serve application: `Replica` behind Ray's proxy, with the limits of the module docstring."""
    from ray import serve

    per_replica = settings.workers + settings.max_queue
    if scale.max_replicas > scale.replicas:
        count = {
            "autoscaling_config": {
                "min_replicas": scale.replicas,
                "max_replicas": scale.max_replicas,
                "target_ongoing_requests": settings.workers,  # more replicas once requests wait
            }
        }
    else:
        count = {"num_replicas": scale.replicas}
    deployment = serve.deployment(
        serve.ingress()(Replica),
        name="inspect",
        max_ongoing_requests=per_replica + PROBES,
        max_queued_requests=settings.max_queue,
        backpressure_config={"status_code": 503, "retry_after_s": PROXY_RETRY_AFTER_S},
        ray_actor_options={"num_cpus": scale.cpus},
        rolling_update_percentage=1e-3,  # one replica at a time (up to 1000 replicas)
        graceful_shutdown_timeout_s=settings.timeout_s,  # a stopping replica finishes its requests
        max_constructor_retry_count=2,  # a bundle that cannot be served fails the start, not 20 times
        **count,
    )
    # A fixed code version (what `serve deploy` derives from a config file's import path): a new user_config is
    # then a rolling reconfigure of the running replicas. Without it serve.run draws a random version at each
    # call, and every reload would restart every replica. Ray 2.60 takes it with `_internal` only.
    version = hashlib.sha256(repr((settings, scale)).encode()).hexdigest()[:16]
    return deployment.options(user_config=user_config, version=version, _internal=True).bind(settings)


class Rollout:
    """A Ray actor (one at a time, like every actor's calls): deploys the application, and each reload."""

    def __init__(self, settings: ServeSettings, scale: ReplicaScale):
        self.settings, self.scale = settings, scale
        self.bundle = str(settings.bundle)

    def deploy(self, bundle: str | None, bundle_id: str | None) -> str:
        """Deploy with `bundle` (default: the path served, read anew) on every replica; returns the path.
        `bundle_id` is what the requesting replica loaded from it: replicas already serving it skip the load."""
        from ray import serve

        self.bundle = bundle or self.bundle
        config = {"bundle": self.bundle, "bundle_id": bundle_id, "generation": time.time_ns()}
        serve.run(application(self.settings, self.scale, config), name=APP, route_prefix="/")
        return self.bundle


def run(settings: ServeSettings, scale: ReplicaScale, host: str, port: int) -> int:
    """Serve on Ray until SIGINT/SIGTERM; SIGHUP reloads the served path on every replica. 0 on a clean stop,
    2 when the bundle could not be served at all."""
    import ray
    from ray import serve

    from hiad_runtime.ray_scoring import connect

    for name, seconds in SLOW_START_S.items():  # a Ray instance started here inherits them (a cluster has its own)
        os.environ.setdefault(name, str(seconds))
    started = connect(scale.address)
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
        except TimeoutError as e:  # Serve waits 60 s for its proxy; Serve's controller keeps starting it
            log.warning("%s; still starting it", e)
        rollout = ray.remote(num_cpus=0)(Rollout).options(name=ROLLOUT, namespace=NAMESPACE).remote(settings, scale)
        signals: queue.Queue[int] = queue.Queue()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda number, _: signals.put(number))
        deploying, serving = rollout.deploy.remote(None, None), False
        while True:
            if deploying is not None and ray.wait([deploying], timeout=0)[0]:
                try:
                    path = ray.get(deploying)
                except ray.exceptions.RayError as e:
                    if not serving:
                        log.error("cannot serve %s: %s", settings.bundle, e)
                        return 2
                    log.error("SIGHUP reload failed, still serving the previous bundle: %s", e)
                else:
                    log.info("serving %s on http://%s:%d (%d replicas at start)", path, host, port, scale.replicas)
                deploying, serving = None, True
            try:
                number = signals.get(timeout=1)
            except queue.Empty:
                continue
            if number != signal.SIGHUP:
                return 0
            deploying = deploying or rollout.deploy.remote(None, None)  # the served path, read anew
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
