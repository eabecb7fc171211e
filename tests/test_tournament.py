"""Trace files, the regret arithmetic, and a small tournament end to end (simulator only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchpilot.bench.traces import TraceError, read_trace
from batchpilot.config import ControllerConfig
from batchpilot.sim.driver import SimRequest
from batchpilot.sim.tournament import Runner, hindsight_regret, regret_table

# The first 300 requests of the Azure LLM inference trace (code, 2023) that ../shared/traces holds.
AZURE = Path(__file__).parent / "data" / "azure_code_2023_head300.csv"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_azure_trace_reads_times_and_lengths(tmp_path):
    f = write(tmp_path / "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                  "2023-11-16 18:15:46.0520000,3180,8\n"
                                  "2023-11-16 18:15:46.0000000,4808,10\n"
                                  "2023-11-16 18:15:48.5000000,100,0\n"
                                  "2023-11-16 18:15:49.2500000,20,5\n")
    trace = read_trace(f)
    assert trace.format == "azure" and trace.dropped_empty == 1
    assert [(round(r.arrival_s, 3), r.prompt_len, r.output_len) for r in trace.requests] == [
        (0.0, 4808, 10), (0.052, 3180, 8), (3.25, 20, 5)]
    window = trace.window(start_s=0.05, duration_s=10, time_scale=2)  # [0.05, 10.05), twice as fast
    assert [(round(r.arrival_s, 3), r.prompt_len) for r in window] == [(0.0, 3180), (1.599, 20)]


def test_burstgpt_and_jsonl_traces(tmp_path):
    burst = write(tmp_path / "b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                                      "5,ChatGPT,472,18,490,Conversation log\n"
                                      "2,GPT-4,1000,0,1000,Conversation log\n"
                                      "9.5,GPT-4,30,300,330,API log\n")
    trace = read_trace(burst)
    assert trace.format == "burstgpt" and trace.dropped_empty == 1
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in trace.requests] == [(0.0, 472, 18), (4.5, 30, 300)]
    lines = [{"timestamp": 1.0, "prompt": "hello there", "output_len": 4}, {"timestamp": 0.5, "prompt_len": 7,
                                                                           "output_len": 2}]
    jsonl = write(tmp_path / "c.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    trace = read_trace(jsonl)
    assert [(r.arrival_s, r.prompt_len, r.output_len, r.prompt) for r in trace.requests] == [
        (0.0, 7, 2, None), (0.5, 11, 4, "hello there")]


@pytest.mark.parametrize("name,text,where", [
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,12,3\n2023-11-16 18:15:47.0,x,3\n",
     "a.csv:3: column 'ContextTokens'"),
    ("b.csv", "Timestamp,Request tokens,Response tokens\n1,5\n2,5,6\n", "b.csv:2: column 'Response tokens'"),
    ("c.jsonl", '{"timestamp": 1, "prompt_len": 3, "output_len": 2}\n{"timestamp": 2, "output_len": 2}\n',
     "c.jsonl:2"),
    ("d.csv", "when,in,out\n1,2,3\n", "d.csv:1: unknown trace header"),
])
def test_malformed_rows_name_file_line_and_column_or_are_skipped(tmp_path, name, text, where):
    f = write(tmp_path / name, text)
    with pytest.raises(TraceError, match=where.replace(".", r"\.")):
        read_trace(f)
    if "header" not in where:
        trace = read_trace(f, skip_bad_rows=True)
        assert trace.skipped_rows == 1 and len(trace.requests) == 1


def sharegpt_file(tmp_path: Path) -> Path:
    """A small ShareGPT-format file: usable conversations, and ones vLLM's filters drop."""
    words = lambda k: " ".join(f"w{i}" for i in range(k))  # noqa: E731  (k tokens by str.split)
    conv = lambda p, o: {"conversations": [{"from": "human", "value": words(p)}, {"from": "gpt", "value": words(o)}]}  # noqa: E731
    data = [conv(10, 20), conv(3, 50), conv(1000, 1100), {"conversations": [{"from": "human", "value": "x"}]},
            conv(30, 5), conv(1025, 8), conv(200, 300)]
    return write(tmp_path / "sg.json", json.dumps(data, indent=1))


def test_sharegpt_lengths_filters_and_seeded_order(tmp_path):
    f = sharegpt_file(tmp_path)
    encode = str.split
    trace = read_trace(f, encode=encode, seed=0)
    assert trace.format == "sharegpt" and not trace.timed
    assert sorted((r.prompt_len, r.output_len) for r in trace.requests) == [(10, 20), (30, 5), (200, 300)]
    assert trace.dropped_empty == 4 and all(r.arrival_s == 0 for r in trace.requests)
    assert [r.prompt_len for r in read_trace(f, encode=encode, seed=0).requests] == [
        r.prompt_len for r in trace.requests]  # deterministic for a seed
    assert len(read_trace(f, encode=encode, limit=2).requests) == 2
    # bench reads it through the same reader: the same requests in the same order
    from batchpilot.bench.datasets import sharegpt_requests

    assert [(r.prompt_len, r.max_tokens) for r in sharegpt_requests(f, 3, encode, 0)] == [
        (r.prompt_len, r.output_len) for r in trace.requests]
    with pytest.raises(TraceError, match="needs a tokenizer"):
        read_trace(f)
    # the tournament's workload from it: model-chosen lengths below max_tokens 1024, all at once
    from batchpilot.sim.tournament import builtin_workloads

    w = builtin_workloads([str(f), str(AZURE)], encode)[len(builtin_workloads()):]
    assert [x.name for x in w] == ["sg-sharegpt", "azure_code_2023_head300-trace", "azure_code_2023_head300-trace-late"]
    assert [(r.prompt_len, r.output_len, r.max_tokens) for r in w[0].make(2)] == [
        (r.prompt_len, r.output_len, 1024) for r in trace.requests[:2]]


def test_malformed_sharegpt_names_line_and_column_or_entry(tmp_path):
    broken = write(tmp_path / "b.json", '[\n {"conversations": []},\n {"conversations": [}\n]')
    with pytest.raises(TraceError, match=r"b\.json:3:21: not valid JSON"):
        read_trace(broken, encode=str.split)
    bad = write(tmp_path / "c.json", json.dumps([{"conversations": [{"value": "a b c d e"}, {"value": 7}]},
                                                 {"conversations": [{"value": "a b c d"}, {"value": "e f g h"}]}]))
    with pytest.raises(TraceError, match=r"c\.json: conversation 0: a turn's 'value' is not a string"):
        read_trace(bad, encode=str.split)
    trace = read_trace(bad, encode=str.split, skip_bad_rows=True)
    assert trace.skipped_rows == 1 and [(r.prompt_len, r.output_len) for r in trace.requests] == [(4, 4)]


def test_simulate_takes_a_sharegpt_file_counted_by_the_default_tokenizer(tmp_path):
    from batchpilot.model.loader import load_tokenizer

    f = sharegpt_file(tmp_path)
    out = tmp_path / "sim.json"
    r = subprocess.run([sys.executable, "-m", "batchpilot.cli", "simulate", "--dataset", str(f), "--request-rate",
                        "2", "--output-json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    tok = load_tokenizer()
    expected = read_trace(f, encode=tok.encode)
    assert result["completed"] == len(expected.requests) >= 3
    assert result["total_input_tokens"] == sum(r.prompt_len for r in expected.requests)
    assert result["total_output_tokens"] == sum(r.output_len for r in expected.requests)


def test_a_trace_without_its_times_arrives_at_a_synthetic_rate():
    from batchpilot.cli import build_parser
    from batchpilot.sim.commands import Setup

    args = build_parser().parse_args(["simulate", "--dataset", str(AZURE), "--num-prompts", "200",
                                      "--ignore-trace-times", "--request-rate", "4"])
    timed = read_trace(AZURE).requests[:200]
    work = Setup(args).workload(4.0)
    assert [(w.prompt_len, w.output_len) for w in work] == [(r.prompt_len, r.output_len) for r in timed]
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(work, work[1:])]
    assert 0.2 < sum(gaps) / len(gaps) < 0.3 and min(gaps) > 0  # Poisson at 4/s, not the trace's bursts
    assert all(w.arrival_s == 0 for w in Setup(args).workload(None))  # no rate: all at once


def test_a_real_azure_trace_reads_whole():
    trace = read_trace(AZURE)
    assert len(trace.requests) == 300 and trace.skipped_rows == 0 and trace.dropped_empty == 0
    assert trace.requests[0].prompt_len == 4808 and trace.requests[1].output_len == 8  # the file's first rows
    assert 60 < trace.requests[-1].arrival_s < 300  # 300 requests at about 2.5 per second


def test_regret_against_the_hindsight_best_static_limit():
    rows = {"static-8": {"x": 100.0}, "static-32": {"x": 120.0}, "static-256": {"x": 90.0},
            "combined": {"x": 126.0}, "sglang": {"x": 108.0}, "broken": {"x": None}}
    regret = hindsight_regret(rows, "x")
    assert regret["static-32"] == 0.0 and regret["static-256"] == pytest.approx(0.25)
    assert regret["combined"] == pytest.approx(-0.05) and regret["sglang"] == pytest.approx(0.1)
    assert regret["broken"] is None
    # a capacity search that never broke the SLA is unbounded, not the rate where it stopped
    caps = {"static-8": {"c": 2.0}, "static-64": {"c": None, "c_unbounded": True},
            "combined": {"c": None, "c_unbounded": True}, "sglang": {"c": 3.0}}
    assert hindsight_regret(caps, "c") == {"static-8": None, "static-64": 0.0, "combined": 0.0, "sglang": None}
    caps["static-64"] = {"c": 4.0}
    assert hindsight_regret(caps, "c") == {"static-8": 0.5, "static-64": 0.0, "combined": None, "sglang": 0.25}


def test_a_capacity_at_which_the_workload_arrives_within_one_ttft_is_unbounded():
    from batchpilot.sim.tournament import score

    rows = {"static-8": {"output_throughput": 50.0, "capacity": 1.5},
            "static-64": {"output_throughput": 80.0, "capacity": 2.4},
            "combined": {"output_throughput": 84.0, "capacity": 40.0}}  # 200 requests in 5 s: all at once
    score(rows, 200, 10.0)  # unbounded from 20 req/s
    assert rows["combined"]["capacity"] is None and rows["combined"]["capacity_unbounded"]
    assert rows["static-8"]["capacity_regret"] == pytest.approx(1 - 1.5 / 2.4)
    assert rows["combined"]["capacity_regret"] is None and rows["combined"]["regret"] == pytest.approx(-0.05)


def test_capacity_pools_the_attainment_of_several_arrival_patterns(monkeypatch):
    """One lucky arrival pattern must not carry a capacity: pattern 0 meets the SLA at every rate,
    patterns 1 and 2 miss it from 2 req/s, so the pooled attainment (0.87) breaks at 2 req/s."""
    import batchpilot.sim.tournament as tournament

    # the pattern drawn at (rate, seed), written into the first two arrival times for run() to read
    monkeypatch.setattr(tournament, "arrival_offsets",
                        lambda times, rate, seed=0: [rate, float(seed)] + [0.0] * (len(times) - 2))
    patterns = []

    class Scripted(Runner):
        def run(self, load, capacity, config):
            rate, seed = load[0].arrival_s, load[1].arrival_s
            patterns.append((rate, seed))
            return {"sla_attainment": 1.0 if seed == 0 or rate < 2.0 else 0.8}

    reqs = [SimRequest(0.0, 10, 10) for _ in range(50)]
    pooled = Scripted(None, 16, 4096, None, 512, arrival_seeds=3).capacity(reqs, 4096, ControllerConfig(), False, 4.0,
                                                                          0.9)
    assert 2.0 / 1.01 <= pooled < 2.0
    assert sorted({seed for _, seed in patterns}) == [0.0, 1.0, 2.0] and len(patterns) % 3 == 0
    single = Scripted(None, 16, 4096, None, 512, arrival_seeds=1).capacity(reqs, 4096, ControllerConfig(), False, 4.0,
                                                                          0.9)
    assert single is None  # pattern 0 alone never breaks the SLA
    timed = Scripted(None, 16, 4096, None, 512, arrival_seeds=3)
    patterns.clear()
    assert timed.capacity(reqs, 4096, ControllerConfig(), True, 4.0, 0.9) is None
    assert {seed for _, seed in patterns} == {0.0}  # a trace has one pattern, its own
    # a timed workload drawn at random may pool more draws of itself: here two that break at 2 req/s
    other = [SimRequest(0.0, 11, 10) for _ in range(50)]
    Scripted.run = lambda self, load, capacity, config: {
        "sla_attainment": 1.0 if load[2].prompt_len == 10 or load[0].arrival_s < 2.0 else 0.8}
    drawn = timed.capacity(reqs, 4096, ControllerConfig(), True, 4.0, 0.9, draws=[other, other])
    assert 2.0 / 1.01 <= drawn < 2.0


def test_regret_table_names_the_best_static():
    table = {"w": {"results": {"static-8": {"output_throughput": 10.0, "regret": 0.5},
                               "static-32": {"output_throughput": 20.0, "regret": 0.0},
                               "static-256": {"output_throughput": 15.0, "regret": 0.25},
                               "combined-peak": {"output_throughput": 21.0, "regret": -0.05}}}}
    md = regret_table(table)
    assert "| w | static-32 (20.00) | +25.0% |" in md and "-5.0%" in md
    table["w"]["results"]["combined-peak"] |= {"capacity": None, "capacity_unbounded": True}
    table["w"]["results"]["static-32"] |= {"capacity": 5.0, "capacity_regret": 0.0}
    table["w"]["results"]["static-256"] |= {"capacity": 4.0, "capacity_regret": 0.2}
    assert "| w | static-32 (5.00) | +20.0% |  |  | unbounded |  |" in regret_table(table, "capacity_regret")


def test_small_tournament_end_to_end(tmp_path):
    out = tmp_path / "t.json"
    r = subprocess.run(
        [sys.executable, "-m", "batchpilot.cli", "simulate", "tournament", "--hardware", "A100-80GB",
         "--model", "Llama-2-7B", "--scale", "60", "--static", "8,64", "--workloads", "uniform,phase-shift",
         "--sla", "ttft:5000,tpot:60", "--dataset", str(AZURE), "--output-json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    assert set(table) == {"uniform", "phase-shift"}
    for w in table.values():
        rows = w["results"]
        assert set(rows) == {"static-8", "static-64", "combined-clt", "combined-blocks", "combined-peak",
                             "combined-cost", "sglang"}
        best = max(rows["static-8"]["output_throughput"], rows["static-64"]["output_throughput"])
        for row in rows.values():
            assert row["regret"] == pytest.approx(1 - row["output_throughput"] / best)
            assert row["capacity_unbounded"] or row["capacity"] > 0
    assert any(not row["capacity_unbounded"] for w in table.values() for row in w["results"].values())
    assert "Throughput regret" in r.stdout and "Capacity regret" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "batchpilot.cli", "simulate", "tournament", "--workloads", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--workloads" in bad.stderr and "Traceback" not in bad.stderr
    wide = subprocess.run([sys.executable, "-m", "batchpilot.cli", "simulate", "tournament",
                           "--capacity-tolerance", "0"], capture_output=True, text=True, timeout=120)
    assert wide.returncode == 2 and "--capacity-tolerance" in wide.stderr and "Traceback" not in wide.stderr
    none = subprocess.run([sys.executable, "-m", "batchpilot.cli", "simulate", "tournament", "--arrival-seeds", "0"],
                          capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "--arrival-seeds" in none.stderr and "Traceback" not in none.stderr
