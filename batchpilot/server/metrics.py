"""Prometheus metrics: vLLM's names and meanings, under `batchpilot:`, `vllm:` or both.

`--metrics-names vllm` lets a vLLM dashboard read this server unchanged; the controller's own
series (b_t, b_mem, b_sla, batch size), which vLLM has no name for, stay `batchpilot:` in
every mode. Engine state (queue lengths, KV usage, limits, token and preemption totals) is
read at scrape time by a collector; per-step token counts are observed after each step (off
the event loop, on the engine's thread) and per-request latencies when a request ends.
Histogram buckets are vLLM's (`vllm/v1/metrics/buckets.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from batchpilot.config import SLAClass, within_targets
from batchpilot.controllers.base import StepStats
from batchpilot.engine.engine import LLMEngine

METRICS_NAMES = {"batchpilot": ("batchpilot",), "vllm": ("vllm",), "both": ("batchpilot", "vllm")}
OWN_PREFIX = "batchpilot"  # the controller's series: no vLLM name exists for them

REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                               20.0, 40.0, 80.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)


def request_tokens_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's build_1_2_5_buckets)."""
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return tuple(out)
            out.append(value)
        exponent += 1


@dataclass
class FinishedRequest:
    """What the server knows of a request when it ends (times in seconds from its arrival)."""

    num_prompt_tokens: int
    num_generation_tokens: int
    max_tokens: int
    n: int
    ttft_s: float | None
    e2e_s: float
    queue_s: float | None  # until the scheduler first admitted it
    finish_reason: str | None
    sla_class: SLAClass | None = None  # the SLA class it ran under


class EngineCollector:
    def __init__(self, engine: LLMEngine, model_name: str, prefixes: tuple[str, ...], sla_tpot_s: float | None):
        self.engine = engine
        self.prefixes = prefixes
        self.sla_tpot_s = sla_tpot_s
        self.labels = {"model_name": model_name}

    def collect(self):
        e = self.engine
        s = e.snapshot()
        c = e.counters
        trace = s.controller_trace
        stats = e.last_stats
        shared = {
            "num_requests_running": ("Requests in the running batch.", s.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled.", s.num_waiting),
            "kv_cache_usage_perc": ("Fraction of KV-cache blocks in use (0-1).", s.kv_usage),
        }
        own = {
            "kv_cache_free_blocks": ("Free KV-cache blocks.", s.num_free_blocks),
            "batch_limit": ("b_t: the controller's limit on running sequences.", c.batch_limit),
            "batch_limit_memory": ("b_mem: memory-aware limit (absent: not computed).", trace.get("b_mem")),
            "batch_limit_sla": ("b_sla: SLA-constrained limit (absent: no SLA).", trace.get("b_sla")),
            "batch_size": ("Sequences in the last step.", stats.batch_size if stats else 0),
            "sla_tpot_seconds": ("The TPOT target of the SLA loop (absent: no SLA).", self.sla_tpot_s),
        }
        gauges = [(p, shared) for p in self.prefixes] + [(OWN_PREFIX, own)]
        if OWN_PREFIX not in self.prefixes:  # running requests beside the limit, on the dashboard
            gauges.append((OWN_PREFIX, {"num_requests_running": shared["num_requests_running"]}))
        for prefix, table in gauges:
            for name, (doc, value) in table.items():
                if value is not None:
                    g = GaugeMetricFamily(f"{prefix}:{name}", doc, labels=list(self.labels))
                    g.add_metric(list(self.labels.values()), float(value))
                    yield g
        counters = {
            "num_preemptions": ("Preemptions (recompute) since start.", s.num_preemptions),
            "prompt_tokens": ("Prompt tokens prefilled.", c.num_prompt_tokens),
            "generation_tokens": ("Tokens generated.", c.num_generation_tokens),
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            "prefix_cache_hits": ("Of which found cached.", s.prefix_cache_hits),
        }
        for prefix in self.prefixes:
            for name, (doc, value) in counters.items():
                m = CounterMetricFamily(f"{prefix}:{name}", doc, labels=list(self.labels))
                m.add_metric(list(self.labels.values()), float(value))
                yield m


class _Series:
    """One prefix's request and step series."""

    def __init__(self, prefix: str, registry: CollectorRegistry, max_model_len: int):
        labels = ["model_name"]
        tokens = request_tokens_buckets(max_model_len)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{prefix}:{name}", doc, labels, buckets=buckets, registry=registry)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", TIME_TO_FIRST_TOKEN_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between two streamed outputs of a request.",
                        INTER_TOKEN_LATENCY_BUCKETS)
        self.tpot = hist("request_time_per_output_token_seconds",
                         "A request's mean time per output token after the first.", INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.", REQUEST_LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Time waiting before first admitted.",
                          REQUEST_LATENCY_BUCKETS)
        self.inference = hist("request_inference_time_seconds", "Time from first admitted to finished.",
                              REQUEST_LATENCY_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds", "Time from first admitted to first token.",
                            REQUEST_LATENCY_BUCKETS)
        self.decode = hist("request_decode_time_seconds", "Time from first token to finished.",
                           REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = hist("request_prompt_tokens", "Prompt tokens of a request.", tokens)
        self.generation_tokens = hist("request_generation_tokens", "Tokens generated for a request.", tokens)
        self.max_tokens = hist("request_params_max_tokens", "The max_tokens request parameter.", tokens)
        self.n = hist("request_params_n", "The n request parameter.", REQUEST_PARAMS_N_BUCKETS)
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens (prefill and decode) per engine step.",
                                     ITERATION_TOKENS_BUCKETS)
        self.success = Counter(f"{prefix}:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=registry)


class ServerMetrics:
    def __init__(self, engine: LLMEngine, model_name: str, names: str = "batchpilot",
                 sla_tpot_s: float | None = None):
        if names not in METRICS_NAMES:
            raise ValueError(f"--metrics-names must be one of {', '.join(METRICS_NAMES)}, got {names!r}")
        self.registry = CollectorRegistry()
        prefixes = METRICS_NAMES[names]
        self.registry.register(EngineCollector(engine, model_name, prefixes, sla_tpot_s))
        self.model_name = model_name
        self.series = [_Series(p, self.registry, engine.snapshot().max_model_len) for p in prefixes]
        self.rejected = Counter(f"{OWN_PREFIX}:request_rejected", "Requests refused before reaching the engine.",
                                ["model_name", "status"], registry=self.registry)
        self.class_requests = Counter(
            f"{OWN_PREFIX}:sla_class_requests", "Finished requests per SLA class, and whether they met the class's "
            "TTFT and TPOT targets (attained: true, false, or none for a class without targets).",
            ["model_name", "sla_class", "attained"], registry=self.registry)

    def observe_step(self, stats: StepStats) -> None:
        """Called after every engine step (on the engine's thread)."""
        tokens = stats.num_prefill_tokens + stats.num_decode_tokens
        for s in self.series:
            s.iteration_tokens.labels(self.model_name).observe(tokens)

    def observe_gap(self, gap_s: float) -> None:
        """Time between two streamed outputs of one request (vLLM's per-token inter-token latency)."""
        for s in self.series:
            s.itl.labels(self.model_name).observe(gap_s)

    def observe_request(self, r: FinishedRequest) -> None:
        m = self.model_name
        for s in self.series:
            if r.ttft_s is not None:
                s.ttft.labels(m).observe(r.ttft_s)
                s.decode.labels(m).observe(r.e2e_s - r.ttft_s)
                if r.num_generation_tokens > 1:
                    s.tpot.labels(m).observe((r.e2e_s - r.ttft_s) / (r.num_generation_tokens - 1))
            if r.queue_s is not None:
                s.queue.labels(m).observe(r.queue_s)
                s.inference.labels(m).observe(max(0.0, r.e2e_s - r.queue_s))
                if r.ttft_s is not None:
                    s.prefill.labels(m).observe(max(0.0, r.ttft_s - r.queue_s))
            s.e2e.labels(m).observe(r.e2e_s)
            s.prompt_tokens.labels(m).observe(r.num_prompt_tokens)
            s.generation_tokens.labels(m).observe(r.num_generation_tokens)
            s.max_tokens.labels(m).observe(r.max_tokens)
            s.n.labels(m).observe(r.n)
            s.success.labels(m, r.finish_reason or "abort").inc()
        if r.sla_class is not None:
            self.class_requests.labels(m, r.sla_class.name, _attained(r, r.sla_class)).inc()


def _attained(r: FinishedRequest, cls: SLAClass) -> str:
    """'true' when a finished request met its class's targets, 'false' when not, 'none' without targets."""
    if cls.ttft_ms is None and cls.tpot_ms is None:
        return "none"
    if r.finish_reason is None or r.ttft_s is None:  # aborted, or no token
        return "false"
    tpot_s = (r.e2e_s - r.ttft_s) / (r.num_generation_tokens - 1) if r.num_generation_tokens > 1 else None
    return "true" if within_targets(r.ttft_s, tpot_s, ttft_ms=cls.ttft_ms, tpot_ms=cls.tpot_ms) else "false"
