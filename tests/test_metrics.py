"""/metrics under vLLM's names and meanings, and the Grafana dashboard that reads them."""

import json
import re
from pathlib import Path

import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchpilot.server.metrics import (
    INTER_TOKEN_LATENCY_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
    request_tokens_buckets,
)
from tests.server_utils import running_server

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana" / "batchpilot.json"
PREFIXES = ("batchpilot", "vllm")

# The part of Grafana's dashboard model that Grafana needs to import a dashboard and draw its panels.
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["name", "type"],
            "properties": {"type": {"enum": ["datasource", "custom", "query", "constant", "interval"]}}}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
            "properties": {
                "id": {"type": "integer"},
                "type": {"enum": ["timeseries", "stat", "gauge", "bargauge", "table", "heatmap"]},
                "gridPos": {"type": "object", "required": ["x", "y", "w", "h"], "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 23},
                    "w": {"type": "integer", "minimum": 1, "maximum": 24}}},
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["expr", "refId"],
                    "properties": {"expr": {"type": "string", "minLength": 1}}}},
            }}},
    },
}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queried_metrics(dashboard: dict, prefix: str) -> set[str]:
    """Every series name the panels query, with the $prefix variable set to `prefix`."""
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("${prefix}", prefix)
            names |= set(re.findall(r"\b([a-z_]+:[a-z_]+)", expr))
    return names


def test_dashboard_is_a_valid_grafana_dashboard():
    dashboard = load_dashboard()
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    defined = {v["name"] for v in dashboard["templating"]["list"]} | {"__rate_interval"}
    used = set(re.findall(r"\$\{?(\w+)", json.dumps(panels)))
    assert used <= defined, used - defined
    titles = " ".join(p["title"] for p in panels)
    for shown in ("Batch limit", "KV-cache", "TPOT against the SLA"):
        assert shown in titles
    ours = queried_metrics(dashboard, "batchpilot")
    assert {"batchpilot:batch_limit", "batchpilot:batch_limit_memory", "batchpilot:batch_limit_sla",
            "batchpilot:sla_tpot_seconds", "batchpilot:num_requests_running"} <= ours


def series_names(text: str) -> dict[str, list]:
    """Sample name -> samples, from a Prometheus exposition."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict[str, list], name: str) -> float:
    return sum(s.value for s in samples[name])


@pytest.mark.slow
def test_vllm_names_carry_vllms_meanings_and_the_dashboard_finds_every_series():
    with running_server("--metrics-names", "both", "--sla-tpot-ms", "500", "--max-model-len", "256") as (url, _):
        body = {"prompt": "The capital of France is", "max_tokens": 8, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        usage = events[-1]["usage"]
        assert usage["completion_tokens"] == 8
        samples = series_names(httpx.get(f"{url}/metrics", timeout=10).text)
    prompt = usage["prompt_tokens"]
    for p in PREFIXES:
        assert value(samples, f"{p}:inter_token_latency_seconds_count") == 7  # per token: 8 tokens, 7 gaps
        assert value(samples, f"{p}:request_time_per_output_token_seconds_count") == 1  # per request
        assert value(samples, f"{p}:request_generation_tokens_sum") == 8
        assert value(samples, f"{p}:request_prompt_tokens_sum") == prompt
        assert value(samples, f"{p}:request_params_max_tokens_sum") == 8
        # The prompt's prefill, then one decode token for each sampled token but the last.
        assert value(samples, f"{p}:iteration_tokens_total_sum") == prompt + 7
        for phase in ("queue", "prefill", "decode", "inference"):
            assert value(samples, f"{p}:request_{phase}_time_seconds_count") == 1, phase
        assert value(samples, f"{p}:generation_tokens_total") == 8
    ttft_bounds = sorted(float(s.labels["le"]) for s in samples["vllm:time_to_first_token_seconds_bucket"])
    assert ttft_bounds == [*TIME_TO_FIRST_TOKEN_BUCKETS, float("inf")]
    itl_bounds = sorted(float(s.labels["le"]) for s in samples["vllm:inter_token_latency_seconds_bucket"])
    assert itl_bounds == [*INTER_TOKEN_LATENCY_BUCKETS, float("inf")]
    token_bounds = sorted(float(s.labels["le"]) for s in samples["vllm:request_prompt_tokens_bucket"])
    assert token_bounds == [1, 2, 5, 10, 20, 50, 100, 200, float("inf")] == [*request_tokens_buckets(256), float("inf")]
    assert value(samples, "batchpilot:sla_tpot_seconds") == 0.5
    dashboard = load_dashboard()
    for p in PREFIXES:
        missing = {name for name in queried_metrics(dashboard, p)
                   if name not in samples and f"{name}_bucket" not in samples}
        assert not missing, f"the dashboard queries series the server does not export: {missing}"


@pytest.mark.slow
def test_vllm_names_alone_keep_the_controllers_own_series():
    with running_server("--metrics-names", "vllm", "--max-model-len", "256") as (url, _):
        httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
        samples = series_names(httpx.get(f"{url}/metrics", timeout=10).text)
    assert "vllm:num_requests_running" in samples and "vllm:e2e_request_latency_seconds_count" in samples
    assert not any(name.startswith("batchpilot:e2e") or name == "batchpilot:kv_cache_usage_perc" for name in samples)
    assert {"batchpilot:batch_limit", "batchpilot:batch_limit_memory", "batchpilot:num_requests_running"} <= set(
        samples)


def test_a_finished_request_is_judged_against_its_sla_class():
    from batchpilot.config import SLAClass
    from batchpilot.server.metrics import FinishedRequest, _attained

    cls = SLAClass("interactive", tpot_ms=50, ttft_ms=1000)

    def done(ttft_s, e2e_s, tokens=11, reason="stop"):
        return FinishedRequest(10, tokens, 16, 1, ttft_s, e2e_s, 0.0, reason, cls)

    assert _attained(done(0.5, 0.5 + 10 * 0.05), cls) == "true"  # exactly 50 ms per token
    assert _attained(done(0.5, 0.5 + 10 * 0.051), cls) == "false"  # TPOT over
    assert _attained(done(1.2, 1.3), cls) == "false"  # TTFT over
    assert _attained(done(0.5, 0.5, tokens=1), cls) == "true"  # one token: no TPOT to judge
    assert _attained(done(0.1, 0.2, reason=None), cls) == "false"  # aborted
    assert _attained(done(9.0, 99.0), SLAClass("batch")) == "none"
