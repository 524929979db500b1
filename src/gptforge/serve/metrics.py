"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """Request counts by status, token counters, latency histograms, running/waiting gauges."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gptforge_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("gptforge_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("gptforge_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("gptforge_time_to_first_token_seconds", "Time from arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gptforge_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("gptforge_request_latency_seconds", "End-to-end generation latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("gptforge_queue_time_seconds", "Time waiting before admission to the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("gptforge_requests_running", "Sequences in the running decode batch", registry=r)
        self.waiting = Gauge("gptforge_requests_waiting", "Sequences waiting for a batch slot", registry=r)
        self.queue_capacity = Gauge("gptforge_queue_capacity", "Maximum waiting sequences", registry=r)
        self.batch_capacity = Gauge("gptforge_batch_capacity", "Maximum running sequences", registry=r)
        # Hit rate: rate(gptforge_prefix_cache_hits_total) / rate(gptforge_prefix_cache_queries_total).
        self.prefix_cache_queries = Counter("gptforge_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_cache_hits = Counter("gptforge_prefix_cache_hits",
                                         "Prompt tokens whose keys/values came from the prefix cache", registry=r)
        self.prefix_cache_bytes = Gauge("gptforge_prefix_cache_bytes", "Bytes of keys/values held by the prefix cache",
                                        registry=r)
        self.prefix_cache_capacity = Gauge("gptforge_prefix_cache_capacity_bytes",
                                           "The prefix cache's byte budget (0: off)", registry=r)
        # Acceptance rate: rate(gptforge_accepted_draft_tokens_total) / rate(gptforge_draft_tokens_total).
        self.draft_tokens = Counter("gptforge_draft_tokens", "Prompt-lookup draft tokens verified", registry=r)
        self.accepted_draft_tokens = Counter("gptforge_accepted_draft_tokens",
                                             "Prompt-lookup draft tokens the model kept", registry=r)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
