"""Prometheus metrics of the service, on a registry of its own (scraped at GET /metrics)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from hiad_runtime.serve.budget import BodyBudget
from hiad_runtime.serve.pool import InferencePool

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The service's Prometheus metrics: requests, latency, images, reloads, the model in service, and gauges
    read live from the pool and the body budget."""

    def __init__(self, pool: InferencePool, budget: BodyBudget, rate_window_s: float = 60.0):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hiad_requests", "HTTP requests answered, by path and status", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "hiad_inspect_latency_seconds",
            "POST /v1/inspect, request in to answer out",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.images = Counter("hiad_images", "images inspected", registry=self.registry)
        self.reloads = Counter("hiad_reloads", "bundle reloads, by result", ["result"], registry=self.registry)
        self.model = Info("hiad_model", "the bundle in service", registry=self.registry)
        Gauge("hiad_queue_depth", "requests waiting for a worker", registry=self.registry).set_function(
            lambda: pool.waiting
        )
        Gauge("hiad_inflight", "inferences running", registry=self.registry).set_function(lambda: pool.running)
        held = Gauge(
            "hiad_body_bytes_held", "bytes of request bodies claimed (--max-inflight-mb)", registry=self.registry
        )
        held.set_function(lambda: budget.held)
        self.connections_refused = Counter(
            "hiad_connections_refused",
            "connections closed before a request reached the app, by reason",
            ["reason"],
            registry=self.registry,
        )
        Gauge(
            "hiad_images_per_second",
            f"images inspected per second over the last {rate_window_s:.0f} s",
            registry=self.registry,
        ).set_function(self.images_per_s)
        self.rate_window_s = rate_window_s
        self.started = time.monotonic()
        self._done: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def image_done(self) -> None:
        """Count one image inspected, for the total and the images-per-second rate."""
        self.images.inc()
        now = time.monotonic()
        with self._lock:
            self._done.append(now)
            self._forget(now)

    def images_per_s(self) -> float:
        """Images inspected per second over the last `rate_window_s` (or since start, if shorter)."""
        now = time.monotonic()
        with self._lock:
            self._forget(now)
            return len(self._done) / max(min(self.rate_window_s, now - self.started), 1e-3)

    def _forget(self, now: float) -> None:
        while self._done and self._done[0] < now - self.rate_window_s:
            self._done.popleft()

    def watch_drift(self, drift) -> None:
        """Expose the drift monitor's statistic and level (hiad_runtime.review.drift), read at each scrape."""
        from hiad_runtime.review.drift import LEVELS

        Gauge(
            "hiad_drift_ks_distance",
            "KS distance between recent scores and the bundle's normal-score law (NaN: no reference or no scores)",
            registry=self.registry,
        ).set_function(lambda: _or_nan(drift.report().distance))
        Gauge(
            "hiad_drift_level", "drift warning level: -1 unknown, 0 ok, 1 warn, 2 alarm", registry=self.registry
        ).set_function(lambda: LEVELS[drift.report().level])
        Gauge("hiad_drift_window_scores", "scores in the drift window", registry=self.registry).set_function(
            lambda: len(drift.scores)
        )

    def watch_review(self, keeper) -> None:
        """Expose the review store's writer (hiad_runtime.review.keeper): kept, sampled out, dropped, queued."""
        Gauge("hiad_review_kept", "inspections written to the review store", registry=self.registry).set_function(
            lambda: keeper.kept
        )
        Gauge(
            "hiad_review_skipped", "passing inspections left out by --review-pass-sample", registry=self.registry
        ).set_function(lambda: keeper.skipped)
        dropped = Gauge(
            "hiad_review_dropped",
            "inspections NOT kept, by reason (queue_full, write_error)",
            ["reason"],
            registry=self.registry,
        )
        for reason in keeper.dropped:
            dropped.labels(reason).set_function(lambda reason=reason: keeper.dropped[reason])
        Gauge("hiad_review_queue", "inspections waiting to be written", registry=self.registry).set_function(
            lambda: keeper.waiting
        )
        Gauge("hiad_review_bytes", "bytes of the review store's items", registry=self.registry).set_function(
            keeper.store.bytes_used
        )

    def set_model(self, bundle_id: str, path: str) -> None:
        """Record the bundle in service (id and path) as the `hiad_model` info metric."""
        self.model.info({"bundle_id": bundle_id, "path": path})

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format, for GET /metrics."""
        return generate_latest(self.registry)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value
