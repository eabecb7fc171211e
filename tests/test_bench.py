"""Benchmark client: metric arithmetic, arrivals, capacity search, and an end-to-end run."""

import json
import subprocess
import sys
import threading
import time
from collections import deque

import numpy as np
import pytest

from batchpilot.bench.capacity import capacity_on_grid, search_capacity
from batchpilot.bench.metrics import SLA, RequestRecord, summarize
from batchpilot.bench.serve import arrival_times
from tests.server_utils import free_port, running_server


def test_metrics_hand_computed():
    records = [
        RequestRecord(10, 5, ttft_s=0.1, e2el_s=0.5, itl_s=[0.1, 0.1, 0.1, 0.1]),  # tpot (0.5-0.1)/4 = 100 ms
        RequestRecord(20, 3, ttft_s=0.3, e2el_s=0.7, itl_s=[0.2, 0.2]),  # tpot 200 ms
        RequestRecord(30, 1, ttft_s=0.2, e2el_s=0.2),  # one token: no tpot
        RequestRecord(40, 0, 0.0, 1.0, success=False, error="HTTP 500"),
    ]
    r = summarize(records, duration_s=2.0, sla=SLA(ttft_ms=250, tpot_ms=150))
    assert (r["completed"], r["failed"]) == (3, 1)
    assert r["total_input_tokens"] == 60 and r["total_output_tokens"] == 9
    assert r["request_throughput"] == pytest.approx(1.5) and r["output_throughput"] == pytest.approx(4.5)
    assert r["mean_tpot_ms"] == pytest.approx(150) and r["median_tpot_ms"] == pytest.approx(150)
    assert r["mean_ttft_ms"] == pytest.approx(200)
    assert r["mean_itl_ms"] == pytest.approx((4 * 100 + 2 * 200) / 6)
    assert r["p90_ttft_ms"] == pytest.approx(np.percentile([100, 300, 200], 90))
    # SLA met by: #1 (ttft 100, tpot 100) and #3 (ttft 200, no tpot); not #2 (both), not the failure.
    assert r["sla_attainment"] == pytest.approx(2 / 4) and r["request_goodput"] == pytest.approx(1.0)


@pytest.mark.parametrize("spec", ["tpot:x", "latency:5", "ttft:-1", ""])
def test_sla_spec_errors_name_the_flag(spec):
    with pytest.raises(ValueError, match="--sla"):
        SLA.parse(spec)


@pytest.mark.parametrize("rate,burstiness", [(5.0, 1.0), (20.0, 0.25), (2.0, 4.0)])
def test_arrivals_match_rate_and_burstiness(rate, burstiness):
    gaps = np.diff(arrival_times(20_001, rate, burstiness, seed=3))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    # gamma with shape k has coefficient of variation 1 / sqrt(k)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    assert not arrival_times(5, float("inf")).any()


def test_capacity_search_recovers_a_known_threshold():
    probes = []

    def probe(rate):  # attainment falls off a cliff above 7.3 req/s
        probes.append(rate)
        return 0.97 if rate <= 7.3 else 0.6

    found = search_capacity(probe, target=0.9, start_rate=1.0, tolerance=0.05, max_probes=20)
    assert 7.3 / 1.05 <= found.capacity <= 7.3
    assert [r for r, _ in found.curve] == probes
    assert search_capacity(lambda r: 0.0, start_rate=1.0, min_rate=0.1).capacity == 0.0


def test_capacity_on_a_grid_interpolates_the_first_crossing():
    # 1.0 and 0.95 meet 90%; 0.75 at rate 6 does not: the crossing is a quarter of the way from 4 to 6
    found = capacity_on_grid([(6.0, 0.75), (2.0, 1.0), (4.0, 0.95), (8.0, 0.92)], target=0.9)
    assert found.bounded and found.capacity == pytest.approx(4.5)
    assert [r for r, _ in found.curve] == [2.0, 4.0, 6.0, 8.0]  # the later recovery does not count
    unbounded = capacity_on_grid([(2.0, 1.0), (4.0, 0.91)], target=0.9)
    assert not unbounded.bounded and unbounded.capacity == 4.0
    assert capacity_on_grid([(2.0, 0.5), (4.0, 0.4)], target=0.9).capacity == 0.0


class RateLimitedEndpoint:
    """A fake OpenAI endpoint whose token latency jumps when the arrival rate exceeds `capacity`."""

    def __init__(self, capacity: float):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import StreamingResponse

        self.arrivals: deque[float] = deque(maxlen=10)
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(body: dict):
            import asyncio

            self.arrivals.append(time.monotonic())
            span = self.arrivals[-1] - self.arrivals[0]
            rate = (len(self.arrivals) - 1) / span if len(self.arrivals) == 10 and span > 0 else 0.0
            delay = 0.05 if rate > capacity else 0.002

            async def stream():
                for i in range(5):
                    await asyncio.sleep(delay)
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f't{i}'}]})}\n\n"
                usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _capacity_on_a_fake_endpoint(tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`bench capacity` against an endpoint whose latency jumps above 8 req/s; its run and result."""
    out = tmp_path / "cap.json"
    with RateLimitedEndpoint(capacity=8.0) as url:
        r = subprocess.run(
            [sys.executable, "-m", "batchpilot.cli", "bench", "capacity", "--base-url", url, *flags,
             "--start-rate", "2", "--tolerance", "0.15", "--probe-seconds", "3", "--num-prompts", "12",
             "--burstiness", "1000", "--input-len", "4", "--output-len", "5", "--no-progress",
             "--output-json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert 8.0 / 1.15 * 0.95 <= result["capacity"] <= 8.0 * 1.03, result["curve"]
    return r, result


def test_capacity_command_on_a_fake_endpoint_whose_latency_depends_on_load(tmp_path):
    r, _ = _capacity_on_a_fake_endpoint(tmp_path, "--sla", "tpot:20")
    assert "capacity:" in r.stdout


def test_capacity_pools_the_attainment_of_several_arrival_patterns(tmp_path):
    """Each probe runs every pattern (the same prompts, arrivals drawn from --seed + k) and is judged
    on their mean attainment."""
    _, result = _capacity_on_a_fake_endpoint(tmp_path, "--sla", "tpot:20", "--arrival-seeds", "2")
    assert result["arrival_seeds"] == 2 and len(result["probes"]) == 2 * len(result["curve"])
    for i, point in enumerate(result["curve"]):
        pair = result["probes"][2 * i : 2 * i + 2]
        assert point["sla_attainment"] == pytest.approx((pair[0]["sla_attainment"] + pair[1]["sla_attainment"]) / 2)
        assert pair[0]["request_rate"] == pair[1]["request_rate"] == pytest.approx(point["rate"])


def test_capacity_refuses_no_arrival_pattern():
    r = subprocess.run([sys.executable, "-m", "batchpilot.cli", "bench", "capacity", "--base-url", "http://127.0.0.1:9",
                        "--sla", "tpot:20", "--arrival-seeds", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--arrival-seeds must be at least 1" in r.stderr and "Traceback" not in r.stderr


def test_capacity_can_hold_one_classs_sla(tmp_path):
    r, result = _capacity_on_a_fake_endpoint(tmp_path, "--sla-mix", "strict:0.5,loose:0.5", "--sla-class",
                                             "strict:tpot=20", "--capacity-class", "strict")
    assert result["capacity_class"] == "strict" and "class strict's SLA" in r.stdout
    probe = result["probes"][0]["classes"]
    assert set(probe) == {"strict", "loose"} and "sla_attainment" not in probe["loose"]
    assert probe["strict"]["completed"] + probe["loose"]["completed"] == result["probes"][0]["completed"]


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_bench_serve_speaks_vllms_flags_and_result_format(tmp_path):
    with RateLimitedEndpoint(capacity=1000.0) as url:
        r = subprocess.run(
            [sys.executable, "-m", "batchpilot.cli", "bench", "serve", "--base-url", url, "--num-prompts", "6",
             "--random-input-len", "4", "--random-output-len", "5", "--goodput", "ttft:60000", "tpot:60000",
             "--metric-percentiles", "50,75", "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm",
             "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"],
            capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = _strict_json((tmp_path / "r.json").read_text())  # no Infinity: the rate is the string "inf"
    assert result["request_rate"] == "inf" and result["max_concurrency"] is None
    assert result["backend"] == "openai" and result["num_prompts"] == 6 and result["burstiness"] == 1.0
    assert result["model_id"] == "SmolLM2-135M-Instruct" and len(result["date"]) == len("20261202-010203")
    assert result["completed"] == 6 and result["duration"] > 0
    assert result["request_goodput"] == pytest.approx(6 / result["duration"]) and result["sla_attainment"] == 1.0
    assert result["input_lens"] == [3] * 6 and result["output_lens"] == [5] * 6 and result["errors"] == [""] * 6
    assert len(result["ttfts"]) == 6 and all(len(gaps) == 4 for gaps in result["itls"])
    assert sorted(result["start_times"]) == result["start_times"] and result["start_times"][-1] < 5
    for key in ("p50_ttft_ms", "p75_tpot_ms", "p90_itl_ms", "p99_e2el_ms"):
        assert key in result, key


def test_bench_serve_replays_a_trace_at_its_times_and_time_scale(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": t, "prompt_len": 4, "output_len": 5}) + "\n"
                             for t in (10.0, 10.4, 11.2, 12.0)))
    with RateLimitedEndpoint(capacity=1000.0) as url:
        r = subprocess.run(
            [sys.executable, "-m", "batchpilot.cli", "bench", "serve", "--base-url", url, "--dataset-name", "trace",
             "--dataset", str(trace), "--time-scale", "2", "--num-prompts", "10", "--disable-tqdm",
             "--output-json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 4 and result["request_rate"] == "trace"
    # Sent at the trace's offsets (0, 0.4, 1.2, 2.0 s) replayed twice as fast, to within scheduling jitter.
    assert result["start_times"] == pytest.approx([0.0, 0.2, 0.6, 1.0], abs=0.08)


@pytest.mark.parametrize("flags,message", [
    (["--goodput", "ttft:x"], "--goodput"),
    (["--goodput", "tpot:5", "--sla", "tpot:5"], "--sla and --goodput"),
    (["--metric-percentiles", "150"], "--metric-percentiles"),
    (["--percentile-metrics", "ttft,speed"], "--percentile-metrics"),
    (["--random-range-ratio", "1.5"], "--random-range-ratio"),
    (["--sla-mix", "interactive:-1"], "--sla-mix"),
    (["--sla-mix", "a:1,a:2"], "--sla-mix"),
    (["--sla-mix", "a:1", "--sla-class", "b:tpot=5"], "--sla-class b"),
    (["--sla-mix", "a:1", "--sla-class", "a:speed=5"], "--sla-class"),
])
def test_bench_serve_rejects_bad_vllm_flags_naming_them(flags, message):
    r = subprocess.run([sys.executable, "-m", "batchpilot.cli", "bench", "serve", "--base-url", "http://127.0.0.1:9",
                        "--num-prompts", "2", *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bench_serve_end_to_end_against_batchpilot(tmp_path):
    out = tmp_path / "serve.json"
    with running_server("--max-model-len", "256") as (url, _):
        r = subprocess.run(
            [sys.executable, "-m", "batchpilot.cli", "bench", "serve", "--base-url", url, "--num-prompts", "6",
             "--request-rate", "4", "--input-len", "16", "--output-len", "8", "--ignore-eos", "--sla",
             "ttft:60000,tpot:60000", "--no-progress", "--output-json", str(out)],
            capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        refused = subprocess.run(
            [sys.executable, "-m", "batchpilot.cli", "bench", "serve", "--base-url", "http://127.0.0.1:9",
             "--num-prompts", "2", "--input-len", "4", "--output-len", "2", "--no-progress"],
            capture_output=True, text=True, timeout=120)
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 48 and result["total_input_tokens"] == 96
    assert result["sla_attainment"] == 1.0 and result["mean_itl_ms"] > 0
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "p99_ttft_ms",
                "median_tpot_ms", "std_itl_ms", "p90_e2el_ms", "request_goodput"):
        assert key in result
    assert refused.returncode == 1 and "ConnectError" in refused.stdout and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_bench_compare_writes_a_report(tmp_path):
    report = tmp_path / "report"
    r = subprocess.run(
        [sys.executable, "-m", "batchpilot.cli", "bench", "compare", "--static", "4", "--controllers", "combined",
         "--baseline", "static-4", "--server-args", "--dtype float32 --threads 2 --kv-cache-gib 0.05",
         "--num-prompts", "6", "--input-len", "16", "--output-len", "8", "--ignore-eos", "--sla", "tpot:60000",
         "--no-progress", "--report", str(report)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr + r.stdout
    data = json.loads((report / "compare.json").read_text())
    assert data["baseline"] == "static-4" and set(data["results"]) == {"static-4", "combined"}
    for result in data["results"].values():
        assert result["completed"] == 6 and result["num_preemptions"] is not None
    md = (report / "report.md").read_text()
    assert "| static-4 |" in md and "| combined |" in md and "+0.0%" in md
    assert (report / "latency_cdf.png").exists() and (report / "trace_combined.png").exists()


def test_compare_configurations_for_both_engines(tmp_path):
    import argparse

    from batchpilot.bench.compare import VLLM_SCHEDULER, configurations

    args = argparse.Namespace(static="8,default", controllers="combined", engines="batchpilot,vllm",
                              server_cmd="bp serve", server_args="--threads 2", vllm_cmd="py -m vllm.api",
                              vllm_args="--dtype float32")
    configs = {c.name: c for c in configurations(args, 80.0, tmp_path)}
    assert list(configs) == ["batchpilot static-8", "batchpilot static-default", "batchpilot combined",
                             "vllm static-8", "vllm static-default", "vllm combined"]
    assert configs["batchpilot static-8"].cmd == ["bp", "serve", "--threads", "2", "--batch-controller", "static",
                                                  "--max-num-seqs", "8"]
    assert configs["vllm static-default"].cmd == ["py", "-m", "vllm.api", "--dtype", "float32"]
    assert configs["vllm static-8"].cmd[-2:] == ["--max-num-seqs", "8"] and configs["vllm static-8"].env is None
    vllm_combined = configs["vllm combined"]
    assert vllm_combined.cmd[-2:] == ["--scheduler-cls", VLLM_SCHEDULER]
    assert json.loads(vllm_combined.env["BATCHPILOT_VLLM_CONFIG"]) == {
        "name": "combined", "sla_tpot_ms": 80.0, "trace_path": str(tmp_path / "trace_vllm_combined.jsonl")}
    assert "--sla-tpot-ms" in configs["batchpilot combined"].cmd
    for bad, field in (({"engines": "tgi"}, "--engines"), ({"static": "x"}, "--static"),
                       ({"controllers": "magic"}, "--controllers")):
        with pytest.raises(ValueError, match=field):
            configurations(argparse.Namespace(**{**vars(args), **bad}), 80.0, tmp_path)


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    import socket

    from batchpilot.bench.servers import _ephemeral_range

    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert not any(low <= p <= high for p in ports)
    with socket.socket() as ephemeral:
        ephemeral.bind(("127.0.0.1", 0))  # what vLLM's engine does for its own ports
        assert ephemeral.getsockname()[1] not in ports
        for port in ports[:5]:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
