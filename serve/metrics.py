"""Prometheus metrics, one registry per app so that several apps can share a process."""

from prometheus_client import CollectorRegistry, Counter, Histogram

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
