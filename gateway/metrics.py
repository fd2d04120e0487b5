"""Prometheus metrics of one gateway (a registry per app, so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from starlette.responses import Response

# Seconds: from a text query through the local model (~ms) up to a slow OCR on CPU (~tens of s).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class PrometheusText(Response):
    """Prometheus' text exposition format (so the OpenAPI document says what ``/metrics`` really sends)."""

    media_type = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "/predict requests answered, by task and HTTP status.", ["task", "status"], registry=r
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "/predict latency seen by Immich, by task.",
            ["task"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "/predict requests being served.", registry=r)
        self.backend_requests = Counter(
            "gateway_backend_requests",
            "Attempts sent to a backend, by outcome (ok, client_error, failure).",
            ["backend", "task", "outcome"],
            registry=r,
        )
        self.backend_errors = Counter(
            "gateway_backend_errors",
            "Failed backend attempts, by kind (connect, timeout, http_status, invalid_response, ...).",
            ["backend", "task", "kind"],
            registry=r,
        )
        self.backend_latency = Histogram(
            "gateway_backend_duration_seconds",
            "Time of one attempt on a backend, by task.",
            ["backend", "task"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.skipped = Counter(
            "gateway_backend_skipped",
            "Backends passed over without an attempt, by reason (breaker_open, model, deadline).",
            ["backend", "task", "reason"],
            registry=r,
        )
        self.failovers = Counter(
            "gateway_failovers",
            "Times a request moved on to the next backend after a failure.",
            ["task", "from_backend"],
            registry=r,
        )
        self.backend_up = Gauge(
            "gateway_backend_up", "1 when the backend's last health check passed, else 0.", ["backend"], registry=r
        )
        self.breaker_state = Gauge(
            "gateway_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", ["backend", "task"], registry=r
        )
