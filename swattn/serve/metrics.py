"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """What the engine and the HTTP layer count; ``render()`` gives the text format."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("swattn_requests_running", "Requests holding a sequence slot", registry=r)
        self.waiting = Gauge("swattn_requests_waiting", "Requests queued for a slot", registry=r)
        self.slots = Gauge("swattn_slots_total", "Sequence slots (--parallel)", registry=r)
        self.requests = Counter("swattn_requests", "Requests finished, by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("swattn_prompt_tokens", "Prompt tokens received", registry=r)
        self.prefilled_tokens = Counter("swattn_prefilled_tokens", "Prompt tokens run through the model", registry=r)
        self.generated_tokens = Counter("swattn_generated_tokens", "Tokens generated", registry=r)
        self.prefix_queries = Counter("swattn_prefix_cache_queries", "Requests looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("swattn_prefix_cache_hits", "Requests that reused a saved prefix", registry=r)
        self.prefix_hit_tokens = Counter("swattn_prefix_cache_hit_tokens", "Prompt tokens reused from saved prefixes",
                                         registry=r)
        self.prefix_bytes = Gauge("swattn_prefix_cache_bytes", "Bytes held by saved prefixes", registry=r)
        self.kv_bytes = Gauge("swattn_kv_cache_bytes", "Bytes of the slots' KV caches (preallocated)", registry=r)
        self.kv_bytes_used = Gauge("swattn_kv_cache_bytes_used", "Bytes of KV cache holding tokens", registry=r)
        self.ttft = Histogram("swattn_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("swattn_inter_token_latency_seconds", "Time between a stream's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("swattn_http_errors", "Error responses, by status", ["status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
