"""Prometheus metrics, one registry per app so that several apps can share a process."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ratchet_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ratchet_completion_latency_seconds",
            "Chat completion latency by public model.",
            ["model", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "ratchet_tokens",
            "Tokens by public model and kind (prompt, completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.votes = Counter(
            "ratchet_votes",
            "Thumbs votes by rating.",
            ["rating"],
            registry=self.registry,
        )
        self.engine_ready = Gauge(
            "ratchet_engine_ready",
            "1 while an engine replica is up with production and the candidate loaded.",
            ["engine"],
            registry=self.registry,
        )
        self.adapter_loads = Counter(
            "ratchet_engine_adapter_loads",
            "Adapters loaded into a replica, by why: reconcile (before it takes requests) "
            "or request (it had forgotten one between two checks).",
            ["engine", "reason"],
            registry=self.registry,
        )
        self.choices = Counter(
            "ratchet_comparison_choices",
            "Pairwise choices by outcome.",
            ["choice"],
            registry=self.registry,
        )

    def completion(
        self, model: str, stream: bool, seconds: float, prompt: int | None, completion: int | None
    ) -> None:
        self.latency.labels(model, str(stream).lower()).observe(seconds)
        if prompt:
            self.tokens.labels(model, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(model, "completion").inc(completion)
