"""Prometheus metrics, one registry per app so that several apps can share a process."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from feedback.log import AnswerLog
from ratchet.db import DatabaseWatch
from ratchet.settings import mask_url

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
        self.rate_limited = Counter(
            "ratchet_rate_limited",
            "Requests refused with 429, by the limit they were over: requests, tokens, "
            "concurrency, in_flight or auth_failures.",
            ["limit"],
            registry=self.registry,
        )

    def watch(self, answers: AnswerLog, database: DatabaseWatch) -> None:
        """Report the database's state and the spool's, read at each scrape."""
        self.registry.register(_StorageCollector(answers, database))

    # ratchet.replicas.ReplicaEvents
    # /metrics is unauthenticated: replicas are labelled with credentials masked.
    def replica_ready(self, url: str, ready: bool) -> None:
        self.engine_ready.labels(mask_url(url)).set(1 if ready else 0)

    def adapter_loaded(self, url: str, reason: str) -> None:
        self.adapter_loads.labels(mask_url(url), reason).inc()

    def completion(
        self, model: str, stream: bool, seconds: float, prompt: int | None, completion: int | None
    ) -> None:
        self.latency.labels(model, str(stream).lower()).observe(seconds)
        if prompt:
            self.tokens.labels(model, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(model, "completion").inc(completion)


class _StorageCollector(Collector):
    def __init__(self, answers: AnswerLog, database: DatabaseWatch) -> None:
        self.answers = answers
        self.database = database

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        spool = self.answers.spool
        yield GaugeMetricFamily(
            "ratchet_database_up",
            "1 while the gateway reaches Postgres, 0 while it serves from its caches and spool.",
            value=1 if self.database.up else 0,
        )
        yield GaugeMetricFamily(
            "ratchet_spool_entries",
            "Writes in the spool waiting for the database (answers, votes, comparisons).",
            value=spool.depth if spool else 0,
        )
        yield GaugeMetricFamily(
            "ratchet_spool_bytes", "Size of the spool file.", value=spool.bytes if spool else 0
        )
        stats = self.answers.stats
        for name, value, help_text in (
            ("replayed", stats.replayed, "Spooled writes copied into the database."),
            ("dead", stats.dead, "Spooled writes the database refused (kept in dead.jsonl)."),
            ("refused", stats.refused, "Writes refused with 503: spool full or disabled."),
        ):
            yield CounterMetricFamily(f"ratchet_spool_{name}", help_text, value=value)
