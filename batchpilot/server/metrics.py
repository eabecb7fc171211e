"""Prometheus metrics with vLLM's names under the `batchpilot:` prefix.

Engine state (queue lengths, KV usage, limits, token and preemption totals) is read at
scrape time by a collector, so the step loop does no metrics work; per-request latency
histograms are observed by the server when a request ends.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from batchpilot.engine.engine import LLMEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class EngineCollector:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def collect(self):
        e = self.engine
        s = e.scheduler
        c = e.counters
        trace = e.controller.trace
        stats = e.last_stats
        gauges = {
            "num_requests_running": ("Requests in the running batch.", len(s.running)),
            "num_requests_waiting": ("Requests waiting to be scheduled.", len(s.waiting)),
            "kv_cache_usage_perc": ("Fraction of KV-cache blocks in use (0-1).", s.kv.pool.usage),
            "kv_cache_free_blocks": ("Free KV-cache blocks.", s.kv.pool.num_free_blocks),
            "batch_limit": ("b_t: the controller's limit on running sequences.", c.batch_limit),
            "batch_limit_memory": ("b_mem: memory-aware limit (absent: not computed).", trace.get("b_mem")),
            "batch_limit_sla": ("b_sla: SLA-constrained limit (absent: no SLA).", trace.get("b_sla")),
            "batch_size": ("Sequences in the last step.", stats.batch_size if stats else 0),
        }
        for name, (doc, value) in gauges.items():
            if value is not None:
                g = GaugeMetricFamily(f"batchpilot:{name}", doc, labels=list(self.labels))
                g.add_metric(list(self.labels.values()), float(value))
                yield g
        counters = {
            "num_preemptions": ("Preemptions (recompute) since start.", s.num_preemptions_total),
            "prompt_tokens": ("Prompt tokens prefilled.", c.num_prompt_tokens),
            "generation_tokens": ("Tokens generated.", c.num_generation_tokens),
        }
        for name, (doc, value) in counters.items():
            m = CounterMetricFamily(f"batchpilot:{name}", doc, labels=list(self.labels))
            m.add_metric(list(self.labels.values()), float(value))
            yield m


class ServerMetrics:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("batchpilot:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("batchpilot:time_per_output_token_seconds", "Mean time per output token after the first.",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("batchpilot:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.success = Counter("batchpilot:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)
        self.rejected = Counter("batchpilot:request_rejected", "Requests refused before reaching the engine.",
                                labels + ["status"], registry=self.registry)

    def observe_request(self, ttft_s: float | None, e2e_s: float, num_tokens: int, finish_reason: str | None) -> None:
        m = self.model_name
        if ttft_s is not None:
            self.ttft.labels(m).observe(ttft_s)
            if num_tokens > 1:
                self.tpot.labels(m).observe((e2e_s - ttft_s) / (num_tokens - 1))
        self.e2e.labels(m).observe(e2e_s)
        self.success.labels(m, finish_reason or "abort").inc()
