"""The simulator: roofline arithmetic, determinism, and replay against the real engine."""

import pytest

from batchpilot.bench.datasets import LengthDist
from batchpilot.config import ControllerConfig, SchedulerConfig
from batchpilot.executors.simulated import StepShape
from batchpilot.sim.driver import SimRequest, make_workload, simulate
from batchpilot.sim.profile import PROFILE_VERSION
from batchpilot.sim.roofline import Hardware, ModelShape, RooflineModel

TINY = ModelShape("tiny", layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10,
                  max_context=64)
HW = Hardware("toy", peak_tflops=1e-6, mem_bw_gbs=1e-3, mem_gib=1, compute_eff=1.0, mem_eff=1.0, link_bw_gbs=1e-3,
              step_overhead_ms=0.0)  # 1 MFLOP/s and 1 MB/s: times in whole seconds


def test_roofline_hand_computed():
    # layer params: qkv 4*(2+2*1)*2 = 32, o 2*2*4 = 16, mlp 3*4*8 = 96 -> 144; model 2*144 + 2*10*4 = 368
    assert TINY.layer_params == 144 and TINY.params == 368
    assert TINY.kv_bytes_per_token == 2 * 2 * 1 * 2 * 2  # K and V, 2 layers, 1 head of 2, bf16
    m = RooflineModel(TINY, HW)
    # one sequence, 3 new tokens at context 3, one sampled row:
    # linear 2*2*144*3 = 1728, head 2*10*4*1 = 80, attention 4*2*2*2*3*(3 - 1.5) = 144 -> 1952 FLOP -> 1.952 ms
    # memory: weights 368*2 = 736 B + KV 3*16 = 48 B = 784 B -> 0.784 ms; compute-bound
    assert m.step_time(StepShape(0, 0, ((3, 3),), 1)) == pytest.approx(1952e-6)
    # decode of 4 sequences at context 100: flops 2*2*144*4 + 2*10*4*4 + 4*(4*2*2*2*1*99.5) = 2304 + 320 + 12736
    # = 15360 -> 15.36 ms; memory 736 + 4*100*16 = 7136 B -> 7.136 ms: compute-bound
    decode = StepShape(4, 400, (), 4)
    assert m.step_time(decode) == pytest.approx(15360e-6)
    # at 100 kB/s the same step is memory-bound: 7136 B -> 71.36 ms
    slow = RooflineModel(TINY, Hardware(**{**HW.__dict__, "mem_bw_gbs": 1e-4}))
    assert slow.step_time(decode) == pytest.approx(71360e-6)
    # KV capacity: 1 GiB * 0.9 - 736 B of weights, over 16 B per token
    assert m.kv_capacity_tokens() == int((2**30 * 0.9 - 736) // 16)
    two = RooflineModel(TINY, HW, tp=2)
    # halves compute and memory, adds 2 all-reduces per layer of 2*(1/2)*3*4*2 = 24 B at 1 MB/s -> 4 * 24 us
    assert two.step_time(StepShape(0, 0, ((3, 3),), 1)) == pytest.approx(1952e-6 / 2 + 4 * 24e-6)


def test_presets_load_and_kv_capacity_follows_memory():
    a100 = Hardware.preset("A100-80GB")
    small, big = ModelShape.preset("Llama-2-7B"), ModelShape.preset("Llama-2-13B")
    assert RooflineModel(small, a100).kv_capacity_tokens() > RooflineModel(big, a100).kv_capacity_tokens() > 0
    with pytest.raises(ValueError, match="does not fit"):
        RooflineModel(ModelShape.preset("Llama-2-70B"), a100).kv_capacity_tokens()
    assert RooflineModel(ModelShape.preset("Llama-2-70B"), a100, tp=4).kv_capacity_tokens() > 0
    with pytest.raises(ValueError, match="unknown preset"):
        Hardware.preset("TPU")


def run_sim(controller, rate=20.0, seed=1):
    work = make_workload(300, rate, LengthDist.parse("lognormal:150:0.8", "x"), LengthDist.parse("uniform:10:300", "y"),
                         seed=seed, max_prompt=1024, max_total=2048)
    cost = RooflineModel(ModelShape.preset("Llama-2-7B"), Hardware.preset("A100-80GB"))
    return simulate(work, cost.step_time, 40_000, controller, SchedulerConfig(max_num_batched_tokens=2048))


def test_simulation_is_deterministic():
    cfg = ControllerConfig(name="combined", sla_tpot_ms=40)
    a, b = run_sim(cfg), run_sim(cfg)
    assert a.records == b.records and a.duration_s == b.duration_s and a.num_preemptions == b.num_preemptions
    assert len(a.records) == 300
    assert run_sim(cfg, seed=2).records != a.records


def _token_engine(controller: ControllerConfig):
    """A token-only engine on a tight pool (so it preempts), stepping on a roofline clock."""
    from batchpilot.controllers import make_controller
    from batchpilot.engine.block_pool import BlockPool, KVCacheManager
    from batchpilot.engine.engine import LLMEngine
    from batchpilot.engine.scheduler import Scheduler
    from batchpilot.executors.simulated import SimulatedExecutor, VirtualClock
    from batchpilot.sampling_params import SamplingParams

    clock = VirtualClock()
    cost = RooflineModel(ModelShape.preset("Llama-2-7B"), Hardware.preset("A100-80GB"))
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256), KVCacheManager(BlockPool(64, 16)),
                      make_controller(controller), 1024)
    engine = LLMEngine(sched, SimulatedExecutor(cost.step_time, clock), tokenizer=None, clock=clock)
    for i in range(40):
        engine.add_request([1] * (20 + 7 * i % 90), SamplingParams(max_tokens=5 + 11 * i % 60, ignore_eos=True))
    return engine


def test_step_tokens_is_step_without_the_output_objects():
    cfg = ControllerConfig(name="combined", sla_tpot_ms=40)
    a, b = _token_engine(cfg), _token_engine(cfg)
    while a.has_unfinished_requests():
        outs, advanced = a.step(), b.step_tokens()
        assert [(o.request_id, o.outputs[0].token_ids, o.finished) for o in outs] == \
            [(r.request_id, [r.output_token_ids[-1]], r.status.finished) for r in advanced]
    assert not b.has_unfinished_requests()
    assert a.counters == b.counters and a.scheduler.num_preemptions_total == b.scheduler.num_preemptions_total > 0
    assert a.scheduler.kv.pool.num_free_blocks == b.scheduler.kv.pool.num_free_blocks == 64


def test_step_tokens_refuses_an_engine_with_a_tokenizer(llm_fp32):
    with pytest.raises(ValueError, match="step_tokens"):
        llm_fp32.engine.step_tokens()


def test_dynamic_batching_preempts_less_than_an_oversized_static_limit():
    static = run_sim(ControllerConfig(name="static", max_num_seqs=512), rate=float("inf"))
    combined = run_sim(ControllerConfig(name="combined"), rate=float("inf"))
    assert static.num_preemptions > 0
    assert combined.num_preemptions < static.num_preemptions


class ReplayCost:
    """Step times measured on the real engine, returned in order."""

    def __init__(self, times):
        self.times = list(times)
        self.i = 0

    def __call__(self, shape):
        t = self.times[self.i]
        self.i += 1
        return t


@pytest.mark.slow
@pytest.mark.parametrize("name,options,caching", [("static", {}, False), ("static", {}, True),
                                                  ("combined", {"sla_tpot_ms": 15.0}, False)])
def test_simulator_replays_the_real_engines_scheduling_decisions(tmp_path, default_model_dir, name, options, caching):
    """Step for step the same schedule. With prefix caching on (the engine's default) a preempted
    request finds its own blocks again; the prompts share no prefix, as the simulator's do not."""
    import json

    from batchpilot import LLM, SamplingParams

    prompt_lens = [20, 45, 12, 70, 33, 25, 60, 15]
    output_lens = [30, 12, 40, 25, 18, 35, 10, 28]
    trace = tmp_path / "real.jsonl"
    llm = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=14, block_size=16, max_num_batched_tokens=64,
              trace_path=str(trace), batch_controller=name, max_num_seqs=6, enable_prefix_caching=caching, **options)
    # without caching, shared prefixes change nothing; with it, each prompt is its own from the first token
    prompts = [[200 + i] + [100 + j for j in range(1, n)] if caching else [100 + j for j in range(n)]
               for i, n in enumerate(prompt_lens)]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in output_lens]
    llm.generate(prompts, params)
    llm.engine.trace.close()
    real = [json.loads(line) for line in trace.read_text().splitlines()]
    if name == "static":
        assert sum(r["num_preemptions"] for r in real) > 0  # the pool is tight enough to preempt

    sim_trace = tmp_path / "sim.jsonl"
    work = [SimRequest(0.0, p, o) for p, o in zip(prompt_lens, output_lens)]
    controller = ControllerConfig(name=name, max_num_seqs=6, **options)
    simulate(work, ReplayCost(r["step_time_s"] for r in real), 14 * 16, controller,
             SchedulerConfig(max_num_batched_tokens=64), max_model_len=8192, trace_path=str(sim_trace),
             prefix_caching=caching)
    sim = [json.loads(line) for line in sim_trace.read_text().splitlines()]
    keys = ("b_t", "batch_size", "num_prefill_tokens", "num_decode_tokens", "num_preemptions",
            "num_running", "num_waiting", "kv_usage")
    keys += tuple(k for k in ("b_mem", "b_sla", "b_low", "b_high") if k in real[0])
    assert len(sim) == len(real)
    assert [tuple(r[k] for k in keys) for r in sim] == [tuple(r[k] for k in keys) for r in real]
    if caching:  # the cache did save recompute here: without it the same run prefills more
        uncached = tmp_path / "uncached.jsonl"
        simulate(work, lambda shape: 1e-3, 14 * 16, controller, SchedulerConfig(max_num_batched_tokens=64),
                 max_model_len=8192, trace_path=str(uncached), prefix_caching=False)
        steps = [json.loads(line) for line in uncached.read_text().splitlines()]
        assert sum(r["num_prefill_tokens"] for r in real) < sum(r["num_prefill_tokens"] for r in steps)


GRID = {"batch_sizes": [0, 2, 4], "context_lens": [100, 300], "prefill_tokens": [0, 10]}


def affine_profile():
    """step time = 1 ms per decode + 1 us per decode per context token + 0.1 ms per prefill token + 5 ms
    (zero for the empty step): linear in each axis, so interpolation must reproduce it exactly."""
    def t(b, c, p):
        return 0.0 if b == p == 0 else 1e-3 * b + 1e-6 * b * c + 1e-4 * p + 5e-3
    times = [[[t(b, c, p) for p in GRID["prefill_tokens"]] for c in GRID["context_lens"]] for b in GRID["batch_sizes"]]
    return {"version": PROFILE_VERSION, "grid": GRID, "kv_bytes_per_token": 1000, "max_model_len": 512,
            "step_time_s": times}, t


def test_profile_model_interpolates_and_extrapolates_linearly():
    from batchpilot.sim.profile import ProfileModel

    data, t = affine_profile()
    m = ProfileModel(data)
    assert m.step_time(StepShape(2, 200, (), 2)) == pytest.approx(t(2, 100, 0))  # a grid point
    assert m.step_time(StepShape(3, 3 * 200, ((6, 6),), 4)) == pytest.approx(t(3, 200, 6))  # inside: bilinear terms
    # past every edge, from the outermost segment (b*c is bilinear: exact along one axis at a time)
    assert m.step_time(StepShape(8, 8 * 300, ((40, 40),), 9)) == pytest.approx(t(8, 300, 40))
    assert m.step_time(StepShape(4, 4 * 1000, (), 4)) == pytest.approx(t(4, 1000, 0))
    assert m.step_time(StepShape(0, 0, ((10, 10),), 1)) == pytest.approx(t(0, 100, 10))
    assert m.step_time(StepShape(0, 0, (), 0)) == 0.0
    assert m.kv_capacity_tokens(1.0) == 2**30 // 1000
    # the calibration's in-run / grid ratio multiplies every step; with knots, by the step's grid time
    scaled = ProfileModel({**data, "correction": {"step_s": [0.01], "scale": [1.25]}})
    assert scaled.step_time(StepShape(3, 600, ((6, 6),), 4)) == pytest.approx(1.25 * t(3, 200, 6))
    by_size = ProfileModel({**data, "correction": {"step_s": [0.006, 0.024], "scale": [1.2, 1.0]}})
    assert by_size.correction(0.003) == 1.2 and by_size.correction(0.012) == pytest.approx(1.1)
    assert by_size.correction(1.0) == 1.0
    small = t(2, 100, 0)
    assert by_size.step_time(StepShape(2, 200, (), 2)) == pytest.approx(small * by_size.correction(small))
    with pytest.raises(ValueError, match="correction"):
        ProfileModel({**data, "correction": {"step_s": [0.02, 0.01], "scale": [1.0, 1.0]}})


def test_profile_model_costs_each_prefill_chunk_by_its_own_attention():
    from batchpilot.sim.profile import ProfileModel

    # prefill time 10 ms + 0.1 ms per token + 1 us per token^2 (attention of one prompt from position 0)
    grid = {"batch_sizes": [0, 4], "context_lens": [100, 300], "prefill_tokens": [0, 100, 200, 400]}

    def t(b, p):
        return 0.0 if b == p == 0 else 1e-2 + 1e-3 * b + 1e-4 * p + 1e-6 * p * p
    times = [[[t(b, p) for p in grid["prefill_tokens"]] for _ in grid["context_lens"]] for b in grid["batch_sizes"]]
    m = ProfileModel({"version": PROFILE_VERSION, "grid": grid, "kv_bytes_per_token": 1000, "max_model_len": 4096,
                      "step_time_s": times})
    assert m.prefill_square_s == pytest.approx(1e-6)
    whole = m.step_time(StepShape(0, 0, ((400, 400),), 1))  # one prompt from 0: the grid point itself
    assert whole == pytest.approx(t(0, 400))
    # four prompts of 100 in the same budget: the linear cost of 400 tokens, the square of 100 four times
    four = m.step_time(StepShape(0, 0, ((100, 100),) * 4, 4))
    assert four == pytest.approx(1e-2 + 1e-4 * 400 + 4 * 1e-6 * 100 * 100)
    # the last 100 tokens of a 400-token prompt attend to all 400: cost (100 x 350 average context) x 2
    tail = m.step_time(StepShape(4, 4 * 100, ((100, 400),), 5))
    assert tail == pytest.approx(t(4, 100) + 1e-6 * 2 * 100 * 300)
    # measured chunks after cached context decide the attention cost when the profile has them:
    # 200 new tokens, 8 us more per 100 cached tokens -> q = 8e-5 / (2 * 200 * 100)
    context = {"chunk": 200, "offsets": [0, 1000, 3000], "step_s": [0.05, 0.05 + 8e-4, 0.05 + 24e-4]}
    measured = ProfileModel({"version": PROFILE_VERSION, "grid": grid, "kv_bytes_per_token": 1000,
                             "max_model_len": 4096, "step_time_s": times, "prefill_context": context})
    assert measured.prefill_square_s == pytest.approx(8e-4 / 1000 / (2 * 200))
    late = measured.step_time(StepShape(0, 0, ((200, 3200),), 1))  # 200 tokens after 3000 cached
    assert late == pytest.approx(t(0, 200) + 24e-4)


def test_profile_errors_name_the_flag(tmp_path):
    from batchpilot.sim.profile import ProfileGrid, ProfileModel

    with pytest.raises(ValueError, match="--context-lens"):
        ProfileGrid((0, 1), (64,), (0, 16))
    with pytest.raises(ValueError, match="start at 0"):
        ProfileGrid((1, 2), (64, 128), (0, 16))
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "grid": {}}')
    with pytest.raises(ValueError, match="--profile .*not a batchpilot profile"):
        ProfileModel.load(bad)
    data, _ = affine_profile()
    data["step_time_s"] = data["step_time_s"][:2]
    with pytest.raises(ValueError, match="shape"):
        ProfileModel(data)


@pytest.mark.slow
def test_profile_command_measures_the_real_runner_and_feeds_the_simulator(tmp_path, default_model_dir):
    import json
    import subprocess
    import sys

    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "batchpilot.cli"]
    r = subprocess.run([*cmd, "profile", "--model", str(default_model_dir), "--threads", "1", "--batch-sizes", "0,1,8",
                        "--context-lens", "32,256", "--prefill-tokens", "0,64", "--reps", "1", "--output", str(out),
                        "--calibration-prompts", "4", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    times = data["step_time_s"]
    assert times[0][0][0] == 0.0
    assert all(times[i][j][k] > 0 for i in range(3) for j in range(2) for k in range(2) if (i, k) != (0, 0))
    assert data["host"]["threads"] == 1 and data["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2  # SmolLM2, bf16
    cal = data["calibration"]  # the calibration workload's real / grid time, the median of its runs
    assert cal["steps"] > 4 and cal["ratio"] == sorted(cal["ratios"])[1]
    assert sum(b["steps"] for b in cal["bins"]) == cal["steps"]
    assert data["correction"] == {"step_s": [b["mean_step_s"] for b in cal["bins"]],
                                  "scale": [b["ratio"] for b in cal["bins"]]}
    context = data["prefill_context"]  # one 64-token chunk after 0 to 7k cached tokens of its prompt
    assert context["chunk"] == 64 and context["offsets"] == [0, 1024, 3072, 7168]
    assert context["step_s"][-1] > context["step_s"][0] > 0
    elsewhere = tmp_path / "elsewhere.json"  # the same profile, as if measured on another CPU
    elsewhere.write_text(json.dumps({**data, "host": {**data["host"], "cpu": "another CPU"}}))
    r = subprocess.run([*cmd, "profile", "--recalibrate", str(elsewhere), "--model", str(default_model_dir),
                        "--threads", "1", "--output", str(tmp_path / "again.json"), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "measured on another CPU, this machine is" in r.stderr
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["step_time_s"] == times  # the grid is kept
    assert again["calibration"]["host"]["cpu"] == data["host"]["cpu"]  # where the correction was measured
    now = again["calibration"]
    assert now["num_prompts"] == cal["num_prompts"] and now["steps"] == cal["steps"]  # the same workload
    assert again["correction"] == {"step_s": [b["mean_step_s"] for b in now["bins"]],
                                   "scale": [b["ratio"] for b in now["bins"]]}
    r = subprocess.run([*cmd, "simulate", "--profile", str(out), "--kv-cache-gib", "0.01", "--num-prompts", "30",
                        "--input-dist", "uniform:10:60", "--output-dist", "uniform:5:40", "--max-num-batched-tokens",
                        "64", "--output-json", str(tmp_path / "sim.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sim = json.loads((tmp_path / "sim.json").read_text())
    assert sim["completed"] == 30 and sim["kv_capacity_tokens"] == int(0.01 * 2**30 // data["kv_bytes_per_token"])
    r = subprocess.run([*cmd, "simulate", "--profile", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--kv-cache-gib" in r.stderr
