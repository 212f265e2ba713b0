"""Client-side Prometheus metrics of the creative client (Triton's own are on ``serving.metrics_port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from infra.security import http_token, serve_metrics


class ClientMetrics:
    """Requests, latency, cache hits, fallbacks, live version and generation time, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("osmf_creative_requests", "creative_for calls", ["outcome"], registry=r)
        self.latency = Histogram(
            "osmf_creative_latency_seconds", "creative_for latency", registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
        )
        self.cache = Counter("osmf_creative_cache", "slate cache lookups", ["result"], registry=r)
        self.fallbacks = Counter("osmf_creative_fallbacks", "fallback creatives served", ["reason"], registry=r)
        self.explored = Counter("osmf_creative_explored", "served creatives that were not the posterior best",
                                registry=r)
        self.live_version = Gauge("osmf_serving_live_version", "gmllm version the client serves", registry=r)
        self.generation = Histogram(
            "osmf_slate_generation_seconds", "time to generate and render one slate through Triton", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.generation_errors = Counter("osmf_slate_generation_errors", "failed slate generations", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose the registry on ``http://host:port/metrics``."""
        serve_metrics(port, host, self.registry, token=http_token())
