"""The command line: benchmark JSON keys, controller trace and plot, clear errors."""

import json
import subprocess
import sys

import pytest

BENCH_KEYS = ["completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
              "output_throughput", "total_token_throughput", "num_preemptions"] + [
    f"{s}_{m}" for m in ("ttft_ms", "tpot_ms", "e2el_ms") for s in ("mean", "median", "p90", "p99")]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "batchpilot.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bench_throughput_writes_vllm_keys_and_a_trace_that_plots(tmp_path):
    out, trace, png = tmp_path / "r.json", tmp_path / "trace.jsonl", tmp_path / "trace.png"
    r = cli("bench", "throughput", "--num-prompts", "6", "--input-dist", "uniform:8:40", "--output-len", "6",
            "--ignore-eos", "--kv-cache-gib", "0.01", "--threads", "1", "--no-progress", "--output-json", str(out),
            "--controller-trace", str(trace))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    for key in BENCH_KEYS:
        assert key in result, key
    assert result["completed"] == 6 and result["total_output_tokens"] == 36
    assert "output_throughput" in r.stdout
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) == result["num_steps"]
    assert {"t", "b_t", "b_mem", "batch_size", "num_running", "num_waiting", "kv_usage", "step_time_s",
            "num_preemptions"} <= set(rows[0])
    assert sum(r["num_decode_tokens"] + r["num_prefill_tokens"] for r in rows) >= 6 * 6
    r = cli("plot-trace", str(trace), "--out", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,flag", [
    (["--mem-epsilon", "2"], "--mem-epsilon"),
    (["--batch-controller", "nope"], "--batch-controller"),
    (["--min-num-seqs", "9", "--max-num-seqs", "4"], "--min-num-seqs"),
    (["--sla-tpot-ms", "-5"], "--sla-tpot-ms"),
    (["--batch-controller", "sla"], "--sla-tpot-ms"),
])
def test_bad_controller_flags_fail_at_start_naming_the_flag(args, flag):
    r = cli("generate", *args, "hello", timeout=120)
    assert r.returncode == 2
    assert flag in r.stderr and "Traceback" not in r.stderr


def test_bad_length_distribution_is_a_clear_error():
    r = cli("bench", "throughput", "--input-dist", "gauss:1:2", "--num-prompts", "1", timeout=120)
    assert r.returncode == 2 and "--input-dist" in r.stderr and "Traceback" not in r.stderr


def test_plot_trace_rejects_a_missing_or_bad_file(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text("not json\n")
    r = cli("plot-trace", str(bad), "--out", str(tmp_path / "x.png"), timeout=120)
    assert r.returncode == 2 and "t.jsonl:1" in r.stderr
    r = cli("plot-trace", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.png"), timeout=120)
    assert r.returncode == 1 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_bench_throughput_adds_requests_at_their_arrival_times(tmp_path):
    from batchpilot.bench.serve import arrival_times

    out = tmp_path / "r.json"
    r = cli("bench", "throughput", "--num-prompts", "6", "--input-dist", "uniform:8:40", "--output-len", "4",
            "--ignore-eos", "--kv-cache-gib", "0.01", "--threads", "1", "--no-progress", "--request-rate", "4",
            "--seed", "3", "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    last_arrival = arrival_times(6, 4.0, 1.0, 3)[-1]
    assert result["completed"] == 6 and result["request_rate"] == 4.0
    assert result["duration"] >= last_arrival > 0.5  # the run waited for the last arrival
    assert result["mean_ttft_ms"] < 1000 * last_arrival  # TTFT counts from each arrival, not from the start


def test_simulate_sweep_writes_table_json_and_plot(tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    r = cli("simulate", "sweep", "--hardware", "L40S", "--model", "Llama-2-7B", "--kv-cache-gib", "8",
            "--num-prompts", "100", "--static", "8,256", "--controllers", "combined", "--sla-tpot-ms", "40",
            "--sla", "ttft:2000,tpot:40", "--output-json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert list(results) == ["static-8", "static-256", "combined"]
    for name, row in results.items():
        assert row["capacity"] > 0 and row["capacity_curve"], name
        assert all(set(p) == {"rate", "sla_attainment"} for p in row["capacity_curve"])
        assert f"| {name} | {row['output_throughput']:.2f} |" in r.stdout  # the human table
    # 256 sequences on 8 GiB of KV (16k tokens) preempt; 8 (at most 8 x 2048 tokens) cannot
    assert results["static-256"]["num_preemptions"] > results["static-8"]["num_preemptions"] == 0
    assert png.stat().st_size > 10_000


def test_bench_throughput_replays_a_trace_at_its_times(tmp_path):
    trace, out, sim = tmp_path / "t.jsonl", tmp_path / "r.json", tmp_path / "s.json"
    trace.write_text('{"timestamp": 1, "prompt_len": 5, "output_len": 9}\n'
                     '{"timestamp": 3, "prompt_len": 8, "output_len": 4}\n'
                     '{"timestamp": 4.2, "prompt_len": 12, "output_len": 3}\n')
    window = ["--dataset", str(trace), "--trace-start", "2", "--time-scale", "2"]  # the last two, twice as fast
    r = cli("bench", "throughput", "--dataset-name", "trace", *window, "--kv-cache-gib", "0.01",
            "--threads", "1", "--no-progress", "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["completed"] == 2 and result["total_output_tokens"] == 7  # outputs forced to the traced lengths
    assert result["total_input_tokens"] == 20
    assert result["request_rate"] == "trace" and result["duration"] >= 0.6  # the second arrives 0.6 s in
    # the simulator reads the same requests from the same file and flags
    r = cli("simulate", *window, "--output-json", str(sim))
    assert r.returncode == 0, r.stderr
    simulated = json.loads(sim.read_text())
    for key in ("completed", "total_input_tokens", "total_output_tokens"):
        assert simulated[key] == result[key], key
