"""The server's Prometheus metrics: latency histograms observed per request, and the
engine's counters and gauges read from `engine.metrics()` at each scrape. Each app has
its own `CollectorRegistry`, so several servers in one process do not share series."""

from __future__ import annotations

# Latency buckets in seconds (vLLM's serving metrics use buckets of this spread).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

_GAUGES = (  # engine.metrics() field -> (metric name, help)
    ("requests_running", "jaxllama_requests_running", "requests in a decode slot"),
    ("requests_waiting", "jaxllama_requests_waiting", "requests waiting for a slot"),
    ("slots_total", "jaxllama_slots_total", "decode slots"),
    ("slots_used", "jaxllama_slots_used", "decode slots in use"),
    ("pages_total", "jaxllama_kv_pages_total", "KV-cache pages in the pool"),
    ("pages_used", "jaxllama_kv_pages_used", "KV-cache pages held by running requests"),
    ("pages_cached", "jaxllama_kv_pages_cached",
     "KV-cache pages held only by the prefix cache (evictable)"),
    ("pages_free", "jaxllama_kv_pages_free", "KV-cache pages free"),
)
_COUNTERS = (
    ("prompt_tokens_total", "jaxllama_prompt_tokens", "prompt tokens of admitted requests"),
    ("generation_tokens_total", "jaxllama_generation_tokens", "tokens generated"),
    ("prefix_query_tokens", "jaxllama_prefix_cache_queries_tokens",
     "prompt tokens looked up in the prefix cache"),
    ("prefix_hit_tokens", "jaxllama_prefix_cache_hits_tokens",
     "prompt tokens found in the prefix cache (not computed again)"),
)


class _EngineCollector:
    def __init__(self, engine):
        self._engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self._engine.metrics().as_dict()
        for field, name, help in _GAUGES:
            yield GaugeMetricFamily(name, help, value=m[field])
        for field, name, help in _COUNTERS:
            yield CounterMetricFamily(name, help, value=m[field])


class ServerMetrics:
    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.ttft = Histogram("jaxllama_time_to_first_token_seconds",
                              "time from the request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("jaxllama_inter_token_latency_seconds",
                             "time between two tokens of one choice, as the server got them",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("jaxllama_e2e_request_latency_seconds",
                             "time from the request's arrival to its last token",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("jaxllama_request_choices_finished",
                                "choices ended, by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def observe_choice(self, arrival: float, token_times: list[float], end: float,
                       finish_reason: str) -> None:
        if token_times:
            self.ttft.observe(token_times[0] - arrival)
            for a, b in zip(token_times, token_times[1:]):
                self.itl.observe(b - a)
        self.e2e.observe(end - arrival)
        self.finished.labels(finish_reason=finish_reason).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
