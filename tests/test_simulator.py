"""The simulator: roofline arithmetic, determinism, and replay against the real engine."""

import pytest

from batchpilot.bench.datasets import LengthDist
from batchpilot.config import ControllerConfig, SchedulerConfig
from batchpilot.sim.driver import SimRequest, make_workload, simulate
from batchpilot.sim.roofline import Hardware, ModelShape, RooflineModel, StepShape

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
    assert m.step_time(StepShape((3,), (3,), 1)) == pytest.approx(1952e-6)
    # decode of 4 sequences at context 100: flops 2*2*144*4 + 2*10*4*4 + 4*(4*2*2*2*1*99.5) = 2304 + 320 + 12736
    # = 15360 -> 15.36 ms; memory 736 + 4*100*16 = 7136 B -> 7.136 ms: compute-bound
    decode = StepShape((1,) * 4, (100,) * 4, 4)
    assert m.step_time(decode) == pytest.approx(15360e-6)
    # at 100 kB/s the same step is memory-bound: 7136 B -> 71.36 ms
    slow = RooflineModel(TINY, Hardware(**{**HW.__dict__, "mem_bw_gbs": 1e-4}))
    assert slow.step_time(decode) == pytest.approx(71360e-6)
    # KV capacity: 1 GiB * 0.9 - 736 B of weights, over 16 B per token
    assert m.kv_capacity_tokens() == int((2**30 * 0.9 - 736) // 16)
    two = RooflineModel(TINY, HW, tp=2)
    # halves compute and memory, adds 2 all-reduces per layer of 2*(1/2)*3*4*2 = 24 B at 1 MB/s -> 4 * 24 us
    assert two.step_time(StepShape((3,), (3,), 1)) == pytest.approx(1952e-6 / 2 + 4 * 24e-6)


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
@pytest.mark.parametrize("name,options", [("static", {}), ("combined", {"sla_tpot_ms": 15.0})])
def test_simulator_replays_the_real_engines_scheduling_decisions(tmp_path, default_model_dir, name, options):
    import json

    from batchpilot import LLM, SamplingParams

    prompt_lens = [20, 45, 12, 70, 33, 25, 60, 15]
    output_lens = [30, 12, 40, 25, 18, 35, 10, 28]
    trace = tmp_path / "real.jsonl"
    llm = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=14, block_size=16, max_num_batched_tokens=64,
              trace_path=str(trace), batch_controller=name, max_num_seqs=6, **options)
    prompts = [[100 + j for j in range(n)] for n in prompt_lens]
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
             SchedulerConfig(max_num_batched_tokens=64), max_model_len=8192, trace_path=str(sim_trace))
    sim = [json.loads(line) for line in sim_trace.read_text().splitlines()]
    keys = ("b_t", "batch_size", "num_prefill_tokens", "num_decode_tokens", "num_preemptions",
            "num_running", "num_waiting", "kv_usage")
    keys += tuple(k for k in ("b_mem", "b_sla", "b_low", "b_high") if k in real[0])
    assert len(sim) == len(real)
    assert [tuple(r[k] for k in keys) for r in sim] == [tuple(r[k] for k in keys) for r in real]
