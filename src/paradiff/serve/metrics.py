"""Prometheus metrics of `paradiff serve`, in a registry of their own (one per app, so tests can build several).

    paradiff_queue_depth                      requests accepted and waiting for the ranks (gauge)
    paradiff_busy                             1 while the ranks run a generation (gauge)
    paradiff_ready                            1 once warmed up and serving, 0 while loading, draining or failed
    paradiff_request_seconds{size}            accepted request -> response ready, successful requests (histogram)
    paradiff_queue_wait_seconds{size}         time a request waited for the ranks (histogram)
    paradiff_generation_seconds{size}         the pipeline call on rank 0 (histogram)
    paradiff_images_total{size}               images returned (counter)
    paradiff_requests_total{code}             responses of POST /v1/images by HTTP status (counter)
    paradiff_failures_total{reason}           requests not answered with images: invalid, unauthorized, too_large,
                                              overloaded, not_ready, timeout, disconnected, error (counter)
"""

from __future__ import annotations

from typing import Callable

from paradiff.errors import UserError

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
FAILURE_REASONS = ("invalid", "unauthorized", "too_large", "overloaded", "not_ready", "timeout", "disconnected",
                   "error")


class Metrics:
    def __init__(self, queue_depth: Callable[[], float], busy: Callable[[], float], ready: Callable[[], float]):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise UserError("paradiff serve needs prometheus-client: pip install 'paradiff[serve]'.") from None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("paradiff_queue_depth", "Requests accepted and waiting for the ranks", registry=r).set_function(
            queue_depth)
        Gauge("paradiff_busy", "1 while the ranks run a generation", registry=r).set_function(busy)
        Gauge("paradiff_ready", "1 once warmed up and serving", registry=r).set_function(ready)
        self.request_seconds = Histogram("paradiff_request_seconds", "Accepted request to response ready (success)",
                                         ["size"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("paradiff_queue_wait_seconds", "Time waiting for the ranks", ["size"],
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.generation_seconds = Histogram("paradiff_generation_seconds", "Pipeline call on rank 0", ["size"],
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("paradiff_images", "Images returned", ["size"], registry=r)
        self.requests = Counter("paradiff_requests", "Responses of POST /v1/images by status", ["code"], registry=r)
        self.failures = Counter("paradiff_failures", "Requests not answered with images, by reason", ["reason"],
                                registry=r)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)  # every series exists from the start (rate() needs a first sample)

    def fail(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
