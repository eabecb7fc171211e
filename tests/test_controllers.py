"""The paper's controllers: formulas against hand-computed cases, properties, and closed loops."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.config import ControllerConfig
from batchpilot.controllers import CombinedController, MemoryController, SLAController, make_controller
from batchpilot.controllers.base import SchedulerView, SeqState, StepStats
from batchpilot.controllers.memory import blocks_batch_limit, clt_batch_limit


def view(running=0, waiting=0, decoding=None, free=100, total=100, block_size=16, prompt_lens=(), output_lens=()):
    return SchedulerView(running, waiting, running if decoding is None else decoding, free, total, block_size,
                         lambda: [SeqState(p + o, o, math.inf) for p, o in zip(prompt_lens, output_lens)])


def stats(batch, step_s, prefill=0, finished=()):
    return StepStats(batch_size=batch, num_prefill_tokens=prefill, num_decode_tokens=batch, step_time_s=step_s,
                     kv_usage=0.5, num_preemptions=0, num_running=batch, num_waiting=0, finished_lens=tuple(finished))


# ---- b_mem --------------------------------------------------------------------------------------

def test_clt_bound_hand_computed():
    assert clt_batch_limit(100, 0, 1000, 0.05) == 10  # deterministic lengths: eta / mu
    # z = 1.6449; x = (-32.897 + sqrt(1082.2 + 400000)) / 200 = 3.0021 -> b = 9.01 -> 9
    assert clt_batch_limit(100, 20, 1000, 0.05) == 9
    assert 9 * 100 + 1.6449 * 20 * 3 <= 1000 < 10 * 100 + 1.6449 * 20 * math.sqrt(10)


def test_blocks_heuristic_hand_computed():
    # 60 blocks used by 6 sequences = 10 each; 100 * 0.95 / 10 = 9.5 -> 9
    assert blocks_batch_limit(100, 40, 6, 0.95) == 9


def test_blocks_mode_updates_only_with_waiting_and_running_and_clamps():
    c = MemoryController("blocks", min_num_seqs=2, max_num_seqs=50)
    assert c.limit(view(running=0, waiting=5)) == 50  # no running yet: keep the initial B_max
    assert c.limit(view(running=6, waiting=3, free=40)) == 9
    assert c.limit(view(running=6, waiting=0, free=10)) == 9  # nothing waiting: previous value kept
    assert c.limit(view(running=12, waiting=1, free=0)) == 12  # 100*.95/8.33 = 11 -> never below running
    assert c.limit(view(running=1, waiting=1, free=99)) == 50  # 95 -> clamped to B_max


def test_clt_mode_uses_finished_requests_once_enough():
    c = MemoryController("clt", epsilon=0.05, max_num_seqs=1000)
    v = view(running=2, waiting=4, total=100, block_size=10, prompt_lens=(50, 50), output_lens=(0, 0))
    assert c.limit(v) == 20  # prior: running lengths 50, 50 -> sigma 0 -> 1000 / 50
    c.observe(stats(2, 0.01, finished=[100] * 16))
    assert c.limit(v) == 10  # 16 finished at 100 tokens: the window takes over -> 1000 / 100


@settings(max_examples=200, deadline=None)
@given(mode=st.sampled_from(["blocks", "clt"]), total=st.integers(1, 5000), used_frac=st.floats(0, 1),
       running=st.integers(0, 300), waiting=st.integers(0, 50), b_min=st.integers(1, 20),
       span=st.integers(0, 300), lens=st.lists(st.integers(1, 4000), max_size=30))
def test_memory_limit_is_an_integer_in_bounds_and_never_below_running(mode, total, used_frac, running, waiting,
                                                                       b_min, span, lens):
    b_max = b_min + span
    running = min(running, b_max)
    c = MemoryController(mode, min_num_seqs=b_min, max_num_seqs=b_max)
    c.observe(stats(1, 0.01, finished=lens))
    free = total - int(used_frac * total)
    b = c.limit(view(running=running, waiting=waiting, free=free, total=total,
                     prompt_lens=[10] * running, output_lens=[5] * running))
    assert isinstance(b, int)
    assert b_min <= b <= b_max and b >= running


@settings(max_examples=200, deadline=None)
@given(mu=st.floats(1, 2000), sigma=st.floats(0, 2000), eta=st.floats(1, 1e6), eps=st.floats(0.001, 0.5),
       more=st.floats(0, 1e5), eps2=st.floats(0.001, 0.5))
def test_clt_bound_is_monotone_in_capacity_and_epsilon(mu, sigma, eta, eps, more, eps2):
    assert clt_batch_limit(mu, sigma, eta + more, eps) >= clt_batch_limit(mu, sigma, eta, eps)
    lo, hi = sorted((eps, eps2))
    assert clt_batch_limit(mu, sigma, eta, hi) >= clt_batch_limit(mu, sigma, eta, lo)


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.2])
def test_clt_bound_overflows_at_most_epsilon_in_monte_carlo(eps):
    rng = np.random.default_rng(0)
    low, high = 50, 950  # request lengths uniform on [50, 950]: mu 500, sigma 260
    mu, sigma = (low + high) / 2, (high - low) / math.sqrt(12)
    capacity = 40_000
    b = clt_batch_limit(mu, sigma, capacity, eps)
    trials = 20_000
    totals = rng.integers(low, high + 1, size=(trials, b)).sum(axis=1)
    overflow = float((totals > capacity).mean())
    assert overflow <= eps + 3 * math.sqrt(eps * (1 - eps) / trials)
    # and the bound is not trivially small: one more request would overflow more often than eps
    totals_plus = rng.integers(low, high + 1, size=(trials, b + 3)).sum(axis=1)
    assert float((totals_plus > capacity).mean()) > eps


# ---- b_sla --------------------------------------------------------------------------------------

def sla(**kw):
    return SLAController(tpot_ms=kw.pop("tpot_ms", 50), tolerance_ms=kw.pop("tolerance_ms", 5), alpha=4, delta=2,
                         min_num_seqs=1, max_num_seqs=kw.pop("max_num_seqs", 100), percentile=kw.pop("percentile", 0),
                         **kw)


def test_sla_too_slow_moves_interval_down():
    c = sla()
    c.b_low, c.b_high = 20, 60
    c.update(0.070, b_avg=50)  # 70 ms > 50 + 5
    assert (c.b_low, c.b_high, c.b_sla) == (18, 50, 34)  # high = max(50, 20+4); low = max(20-2, 1)


def test_sla_too_fast_moves_interval_up():
    c = sla()
    c.b_low, c.b_high = 20, 60
    c.update(0.030, b_avg=50)  # 30 ms < 50 - 5
    assert (c.b_low, c.b_high, c.b_sla) == (50, 62, 56)  # low = min(50, 60-4); high = min(60+2, 100)


def test_sla_inside_band_tightens_around_the_batch():
    c = sla()
    c.b_low, c.b_high = 20, 60
    c.update(0.052, b_avg=40)
    assert (c.b_low, c.b_high, c.b_sla) == (38, 42, 40)


def test_sla_respects_bounds_and_never_goes_below_decoding():
    c = sla(max_num_seqs=30)
    c.b_low, c.b_high = 28, 30
    c.update(0.010, b_avg=29)
    assert (c.b_low, c.b_high, c.b_sla) == (26, 30, 28)  # high = min(30 + 2, B_max 30)
    assert c.limit(view(running=29, decoding=29)) == 29  # never below the decoding sequences
    assert c.limit(view(running=35, decoding=35)) == 30  # ... nor above B_max
    c.b_sla = 5
    assert c.limit(view(running=12, decoding=12)) == 12


def test_sla_lets_go_while_the_next_request_in_line_risks_its_ttft():
    """With a TTFT target, the loop stops holding admissions back while the request next in line has waited
    more than 80% of it (memory alone bounds the batch), and holds them again once the queue moves."""
    from dataclasses import replace

    c = sla(ttft_ms=5000)
    c.b_sla = 5
    queued = view(running=8, waiting=3, decoding=8)
    assert c.limit(replace(queued, next_wait_s=3.9)) == 8  # 3.9 s < 4.0 s: the TPOT loop holds
    assert c.limit(replace(queued, next_wait_s=4.1)) == 100  # past 80% of 5 s: B_max
    assert c.limit(replace(queued, next_wait_s=0.5)) == 8
    held = sla()
    held.b_sla = 5
    assert held.limit(replace(queued, next_wait_s=60.0)) == 8  # no TTFT target: the loop never lets go


def test_the_sla_loops_window_follows_the_life_of_recent_requests():
    """After requests of ~200 output tokens finish, a 1.5 s prefill chunk stays in the signal for as long as a
    request lives: 30 quiet steps of 70 ms later a request that lived through them saw (1.5 + 30 x 0.07) / 31 =
    116 ms a token, over the 100 ms target, and the loop admits nothing more. A 16-step window has forgotten the
    chunk by then, reads 70 ms as room and opens up."""
    from dataclasses import replace

    def run(finished_outputs):
        c = sla(tpot_ms=100, tolerance_ms=10)  # window 16 at first
        c.observe(replace(stats(4, 0.07), finished_output_lens=finished_outputs))
        c.observe(stats(4, 1.5, prefill=512))
        for _ in range(30):
            c.observe(stats(4, 0.07))
        return c

    lived = run((180, 200, 220))
    assert lived.samples.maxlen == 200
    assert lived.limit(view(running=4, waiting=1, decoding=4)) == 4  # holds the batch it has
    forgot = run(())
    assert forgot.samples.maxlen == 16
    assert forgot.limit(view(running=4, waiting=1, decoding=4)) > 4
    short = run((3, 5))  # never shorter than --sla-window
    assert short.samples.maxlen == 16
    long = run((5000,))  # nor longer than MAX_WINDOW
    assert long.samples.maxlen == 256


def test_sla_lets_go_at_the_ttft_of_the_next_requests_own_class():
    """A request whose SLA class sets a TTFT is released at 80% of that target, not of --sla-ttft-ms: a strict
    class sooner, a lax one later; one with no class keeps the loop's own target."""
    from dataclasses import replace

    c = sla(ttft_ms=5000)
    c.b_sla = 5
    queued = view(running=8, waiting=3, decoding=8)
    assert c.limit(replace(queued, next_wait_s=0.9, next_ttft_ms=1000)) == 100  # past 80% of its own 1 s
    assert c.limit(replace(queued, next_wait_s=4.1, next_ttft_ms=20000)) == 8  # its class allows 20 s
    assert c.limit(replace(queued, next_wait_s=16.1, next_ttft_ms=20000)) == 100
    assert c.limit(replace(queued, next_wait_s=4.1, next_ttft_ms=None)) == 100  # no class: --sla-ttft-ms
    held = sla()  # no --sla-ttft-ms: a class's own target still holds for its requests
    held.b_sla = 5
    assert held.limit(replace(queued, next_wait_s=0.9, next_ttft_ms=1000)) == 100
    assert held.limit(replace(queued, next_wait_s=0.7, next_ttft_ms=1000)) == 8


def test_the_scheduler_reports_how_long_the_next_request_in_line_has_waited():
    from batchpilot.config import SchedulerConfig
    from batchpilot.controllers.static import StaticController
    from batchpilot.engine.block_pool import BlockPool, KVCacheManager
    from batchpilot.engine.engine import LLMEngine
    from batchpilot.engine.scheduler import Scheduler
    from batchpilot.sampling_params import SamplingParams

    now = [10.0]
    sched = Scheduler(SchedulerConfig(), KVCacheManager(BlockPool(64, 4)), StaticController(1), 1024)
    assert sched.view().next_wait_s == 0.0  # no clock yet, nothing waiting
    engine = LLMEngine(sched, None, tokenizer=None, clock=lambda: now[0])
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), "a")
    now[0] = 12.5
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), "b")
    now[0] = 13.0
    assert sched.view().next_wait_s == pytest.approx(3.0)  # "a", first in line, arrived at 10.0
    assert sched.view().next_ttft_ms is None  # it names no SLA class


def test_the_scheduler_reports_the_ttft_target_of_the_next_request_in_lines_class():
    from batchpilot.config import SchedulerConfig, SLAClass
    from batchpilot.controllers.static import StaticController
    from batchpilot.engine.block_pool import BlockPool, KVCacheManager
    from batchpilot.engine.engine import LLMEngine
    from batchpilot.engine.scheduler import Scheduler
    from batchpilot.sampling_params import SamplingParams

    classes = (SLAClass("chat", tpot_ms=60, ttft_ms=2000), SLAClass("batch", tpot_ms=200))
    sched = Scheduler(SchedulerConfig(sla_classes=classes), KVCacheManager(BlockPool(64, 4)), StaticController(1),
                      1024)
    engine = LLMEngine(sched, None, tokenizer=None, clock=lambda: 0.0)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), "b", sla_class="batch")
    assert sched.view().next_ttft_ms is None  # its class sets no TTFT
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), "c", sla_class="chat")
    assert sched.view().next_ttft_ms == 2000  # "c" goes ahead of "b": its TTFT orders the queue


def test_the_simulated_tournament_tells_our_policies_the_ttft_target_and_sglang_nothing():
    from batchpilot.sim.tournament import configurations

    configs = configurations((8, 32), ControllerConfig(), sla_tpot_ms=50, sla_ttft_ms=5000)
    assert configs["combined-cost"].sla_ttft_ms == 5000 and configs["combined-cost"].sla_tpot_ms == 50
    assert configs["sglang"].sla_ttft_ms is None and configs["static-8"].sla_ttft_ms is None
    assert configurations((8,), ControllerConfig(), None, 5000)["combined-cost"].sla_ttft_ms is None


def test_the_sla_targets_rule_tells_our_controllers_alone():
    from batchpilot.sim.tournament import sla_targets

    assert sla_targets("combined", 100.0, 10000.0) == (100.0, 10000.0)
    assert sla_targets("combined", 100.0, None) == (100.0, None)
    assert sla_targets("combined", None, 10000.0) == (None, None)  # TTFT alone does not start the SLA loop
    assert sla_targets("static", 100.0, 10000.0) == sla_targets("sglang", 100.0, 10000.0) == (None, None)


def test_sla_ttft_must_be_positive():
    with pytest.raises(ValueError, match="--sla-ttft-ms"):
        ControllerConfig(sla_tpot_ms=50, sla_ttft_ms=0)


def test_sla_decode_signal_ignores_steps_with_prefill():
    c = sla(signal="decode")
    before = (c.b_low, c.b_high)
    c.observe(stats(10, 5.0, prefill=300))
    assert (c.b_low, c.b_high) == before and not c.samples


def test_sla_tpot_signal_is_the_token_weighted_step_time():
    c = sla()  # signal "tpot": steps with prefill count, weighted by their decode tokens
    c.b_low, c.b_high = 20, 60
    c.observe(stats(10, 0.040))  # 40 ms < 45: too fast -> low = min(10, 60 - 4) = 10, high = 62
    assert (c.b_low, c.b_high) == (10, 62)
    c.observe(stats(30, 0.080, prefill=200))
    # tau = (0.040 * 10 + 0.080 * 30) / 40 = 70 ms > 55: too slow; b_avg = 40 / 2 = 20
    # -> high = max(20, 10 + 4) = 20, low = max(10 - 2, 1) = 8
    assert (c.b_low, c.b_high, c.b_sla) == (8, 20, 14)


def closed_loop(controller, latency, steps, rng, out_len=30):
    """Simulate decoding: admit up to the limit, each request runs ~out_len steps; returns (batch, ms) per step."""
    running: list[int] = []
    history = []
    for t in range(steps):
        limit = controller.limit(view(running=len(running), waiting=100, decoding=len(running)))
        while len(running) < limit:
            running.append(int(rng.integers(out_len // 2, out_len * 3 // 2)))
        b = len(running)
        step_s = latency(b, t)
        controller.observe(stats(b, step_s))
        history.append((b, step_s * 1000))
        running = [r - 1 for r in running if r > 1]
    return history


def in_band_share(history, lo, hi):
    return sum(lo <= ms <= hi for _, ms in history) / len(history)


LINEAR = lambda b, t: (10 + 0.5 * b) / 1000  # noqa: E731  D(b): 40 ms at b = 60


def nonconvex(b, t):
    """A plateau and a cliff: flat 20 ms up to 32 (padding), then a jump, then a steeper slope."""
    ms = 20 if b <= 32 else 28 + 0.4 * (b - 32)
    return ms / 1000


@pytest.mark.parametrize("curve,target", [(LINEAR, 40.0), (nonconvex, 40.0)])
def test_sla_settles_inside_the_band_and_stays(curve, target):
    rng = np.random.default_rng(1)
    c = SLAController(tpot_ms=target, tolerance_ms=4, alpha=4, delta=2, window=4, max_num_seqs=256, percentile=0)
    history = closed_loop(c, curve, 400, rng)
    # Settles within 60 steps (about 30 measured); afterwards at least 90% of steps are inside the band.
    settled = history[60:]
    assert in_band_share(settled, target - 4, target + 4) >= 0.9
    assert max(ms for _, ms in settled) <= target + 4 + 6  # brief excursions stay small


def test_sla_resettles_when_the_curve_shifts():
    rng = np.random.default_rng(2)
    c = SLAController(tpot_ms=40, tolerance_ms=4, alpha=4, delta=2, window=4, max_num_seqs=256, percentile=0)
    shifted = lambda b, t: LINEAR(b, t) if t < 400 else (10 + 1.0 * b) / 1000  # noqa: E731  load doubles cost
    history = closed_loop(c, shifted, 800, rng)
    assert in_band_share(history[60:400], 36, 44) >= 0.9
    assert in_band_share(history[460:], 36, 44) >= 0.9  # re-settled within 60 steps of the shift
    assert np.mean([b for b, _ in history[460:]]) < np.mean([b for b, _ in history[60:400]]) * 0.7


# ---- combined and configuration -------------------------------------------------------------------

def test_combined_takes_the_minimum_and_is_memory_only_without_sla():
    mem = MemoryController("blocks", max_num_seqs=100)
    c = CombinedController(mem, sla(max_num_seqs=100))
    c.sla.b_sla = 7
    assert c.limit(view(running=4, waiting=3, free=60)) == 7  # b_mem = 100*.95/10 = 9
    c.sla.b_sla = 30
    assert c.limit(view(running=4, waiting=3, free=60)) == 9
    assert CombinedController(mem, None).limit(view(running=4, waiting=3, free=60)) == 9
    cfg = make_controller(ControllerConfig())
    assert isinstance(cfg, CombinedController) and cfg.sla is None


@pytest.mark.parametrize("kwargs,flag", [
    (dict(mem_epsilon=0), "--mem-epsilon"), (dict(mem_epsilon=1.5), "--mem-epsilon"),
    (dict(sla_tpot_ms=-1), "--sla-tpot-ms"), (dict(min_num_seqs=10, max_num_seqs=5), "--min-num-seqs"),
    (dict(name="magic"), "--batch-controller"), (dict(name="sla"), "--sla-tpot-ms"),
    (dict(memory_mode="x"), "--memory-mode"), (dict(sla_tolerance_ms=-2, sla_tpot_ms=10), "--sla-tolerance-ms"),
])
def test_bad_configuration_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        ControllerConfig(**kwargs)


# ---- sglang ---------------------------------------------------------------------------------------

def states_view(running, waiting, free, total=100, block_size=16):
    return SchedulerView(len(running), len(waiting), len(running), free, total, block_size,
                         lambda: [SeqState(*s) for s in running], lambda k: [SeqState(*s) for s in waiting[:k]])


def test_sglang_reserves_running_outputs_and_admits_in_order():
    from batchpilot.controllers import SGLangController

    c = SGLangController(clip_max_new_tokens=100)
    # running reserve (min(120, 100) - 20) + (min(5000, 100) - 50) = 130 tokens, x 0.7 = 91;
    # room = 50 free blocks x 16 = 800 - 91 = 709. Waiting costs prompt + clipped max_new in full:
    # 300 + 100 = 400 (room 309), 200 + 50 = 250 (room 59), 10 + 100 = 110 > 59: stop.
    v = states_view([(100, 20, 120), (200, 50, 5000)], [(300, 0, 200), (200, 0, 50), (10, 0, 100)], free=50)
    assert c.reserved_tokens(v) == pytest.approx(91)
    assert c.limit(v) == 4
    # Nothing running and nothing fits: an idle server still admits the head, or it would wait forever.
    assert c.limit(states_view([], [(5000, 0, 4000)], free=10)) == 1


def test_sglang_ratio_decays_to_its_floor_and_resets_on_preemption():
    from batchpilot.controllers import SGLangController

    c = SGLangController()  # 0.7, floor 0.7 x 0.14 = 0.098 over 600 steps
    for _ in range(300):
        c.observe(stats(4, 0.01))
    assert c.ratio == pytest.approx(0.7 - 300 * (0.7 - 0.098) / 600)
    for _ in range(400):
        c.observe(stats(4, 0.01))
    assert c.ratio == pytest.approx(0.098)
    c.observe(StepStats(4, 0, 4, 0.01, 0.9, num_preemptions=1, num_running=3, num_waiting=1))
    assert c.ratio == 0.7
    assert make_controller(ControllerConfig(name="sglang", sglang_init_ratio=0.5)).ratio == 0.5
    with pytest.raises(ValueError, match="--sglang-decay-steps"):
        make_controller(ControllerConfig(name="sglang", sglang_decay_steps=0))


# ---- the peak bound -------------------------------------------------------------------------------

LENGTH_DISTRIBUTIONS = {
    "lognormal": lambda rng, n: np.maximum(1, np.round(rng.lognormal(np.log(150), 0.8, n))).astype(int),
    "uniform": lambda rng, n: rng.integers(32, 257, n),
    "geometric": lambda rng, n: rng.geometric(1 / 100, n),
}


@pytest.mark.parametrize("dist", list(LENGTH_DISTRIBUTIONS))
@pytest.mark.parametrize("epsilon", [0.05, 0.2])
def test_peak_bound_overflows_no_more_often_than_its_epsilon(dist, epsilon):
    """Monte Carlo: draw every admitted request's final length from the true distribution (given what
    it has produced), grow each by a token a step until it ends, and count runs whose KV use ever
    exceeds the pool."""
    from batchpilot.controllers.peak import PeakBound

    rng = np.random.default_rng(7)
    draw = LENGTH_DISTRIBUTIONS[dist]
    bound = PeakBound(epsilon, window=4096)
    bound.lengths.add(tuple(int(x) for x in draw(rng, 4096)))
    finals = draw(rng, 20)
    produced = [int(rng.integers(0, f)) for f in finals]
    running = [(int(p) + g, g, math.inf) for p, g in zip(rng.integers(20, 200, 20), produced)]
    waiting = [(int(p), 0, math.inf) for p in rng.integers(20, 200, 60)]
    total_blocks, bs = 400, 16
    admitted = bound.admissible(states_view(running, waiting, free=0, total=total_blocks, block_size=bs), 60)
    assert 0 < admitted < 60  # the case is neither empty nor trivially roomy

    pool = np.sort(draw(rng, 200_000))
    held = [SeqState(*s) for s in running + waiting[:admitted]]
    trials = 1000
    remaining = np.empty((trials, len(held)), dtype=np.int64)
    for i, s in enumerate(held):
        lo = np.searchsorted(pool, s.num_output, side="right")
        remaining[:, i] = pool[rng.integers(lo, pool.size, trials)] - s.num_output
    steps = np.arange(remaining.max() + 1)
    tokens = np.array([s.num_tokens for s in held])[:, None] + steps[None, :]
    blocks = np.ceil(tokens / bs) * bs  # (requests, steps)
    use = np.einsum("rs,trs->ts", blocks, (steps[None, None, :] < remaining[:, :, None]).astype(np.float64))
    overflow = float(np.mean(use.max(axis=1) > total_blocks * bs))
    assert overflow <= epsilon + 3 * math.sqrt(epsilon * (1 - epsilon) / trials), (admitted, overflow)


def test_peak_bound_at_cold_start_assumes_each_request_runs_to_its_cap():
    from batchpilot.controllers.peak import PeakBound

    bound = PeakBound(0.05)
    # 100 blocks x 16 = 1600 tokens; each waiting request grows to 100 + 300 = 400 tokens (25 blocks): 4 fit.
    v = states_view([], [(100, 0, 300)] * 10, free=100)
    assert bound.admissible(v, 10) == 4


def test_peak_bound_follows_a_long_request_past_a_history_of_short_ones():
    """After a phase of short outputs the finished lengths say "done within ~100 steps"; a request known
    to run 900 more tokens still grows for 900 steps, and the bound must look that far."""
    from batchpilot.controllers.peak import PeakBound

    bound = PeakBound(0.05)
    bound.lengths.add(tuple(range(60, 121)))  # 61 finished short requests: 60-120 output tokens
    # 100 blocks x 16 = 1600 tokens; each waiting request holds 50 tokens now and exactly 900 more at its
    # peak (60 blocks): one fits, two overflow ~750 steps ahead (beyond twice the longest finished).
    v = states_view([], [(50, 0, 900, True)] * 4, free=100)
    assert bound.admissible(v, 4) == 1
    # Unknown lengths: a running request past every finished one (1,000 output tokens) is expected to
    # run as long again (to 2,100 tokens, 132 blocks); it overflows the pool alone ~500 steps ahead, so
    # nothing more is admitted (the old horizon, 256 steps from twice the longest finished, saw 85 blocks).
    running = states_view([(1100, 1000, math.inf)], [(50, 0, math.inf)] * 2, free=31)
    assert bound.admissible(running, 2) == 0


def test_sla_loop_holds_the_chosen_percentile_of_requests_tpot():
    """The per-step signal is scaled by P90 / mean of finished requests' TPOT: a workload whose slowest
    tenth runs 1.5x the mean is held at a mean of target / 1.5."""
    tpots = tuple([0.08] * 18 + [0.12] * 2)  # mean 0.084; P90 (index 18 of 20, sorted) = 0.12
    held, mean_only = SLAController(tpot_ms=100, window=4, percentile=90), SLAController(tpot_ms=100, window=4,
                                                                                        percentile=0)
    for c in (held, mean_only):
        c.observe(StepStats(4, 64, 0, 0.2, 0.5, 0, 4, 0, finished_tpots=tpots))  # a prefill-only step
        c.observe(StepStats(4, 0, 4, 0.070, 0.5, 0, 4, 0))
    assert held.spread == pytest.approx(0.12 / 0.084) and mean_only.spread == 1.0
    # 70 ms x 1.43 = 100 ms: inside the band (90-110), so the interval tightens around the batch of 4;
    # the mean alone (70 ms) looks fast, and the interval opens upwards.
    assert (held.b_low, held.b_high) == (2, 6)
    assert (mean_only.b_low, mean_only.b_high) == (4, 256)
    with pytest.raises(ValueError, match="--sla-percentile"):
        ControllerConfig(sla_tpot_ms=100, sla_percentile=30)


def test_sla_percentile_scaling_forgets_a_phase_within_32_finished_requests():
    """A held-back batch finishes few requests, so the scaling must not wait for many of them: after a
    phase whose slowest eighth ran 1.8x the mean, 32 evenly served requests bring it back to 1."""
    c = SLAController(tpot_ms=50, percentile=90)
    c.observe(StepStats(4, 64, 0, 0.2, 0.5, 0, 4, 0, finished_tpots=tuple(([0.020] * 7 + [0.040]) * 16)))
    assert c.spread > 1.3
    c.observe(StepStats(4, 64, 0, 0.2, 0.5, 0, 4, 0, finished_tpots=tuple([0.025] * 32)))
    assert c.spread == 1.0


# ---- admission past a predicted overflow, weighed by the measured step cost ------------------------

def test_step_cost_model_recovers_the_terms_of_measured_steps():
    from batchpilot.controllers.step_cost import StepCostModel

    rng = np.random.default_rng(3)
    model = StepCostModel(refit_every=1)
    assert model.cost() is None
    for i in range(200):
        prefill = int(rng.integers(1, 512)) if i % 3 == 0 else 0
        decode = int(rng.integers(1, 64))
        seconds = 0.011 + 0.0004 * prefill + 0.0006 * decode + rng.normal(0, 0.0002)
        model.add(StepStats(decode, prefill, decode, seconds, 0.5, 0, decode, 0))
    cost = model.cost()
    assert cost.fixed_s == pytest.approx(0.011, rel=0.05)
    assert cost.per_prefill_s == pytest.approx(0.0004, rel=0.05)
    assert cost.per_decode_s == pytest.approx(0.0006, rel=0.05)


def test_step_cost_model_waits_for_steps_of_both_kinds():
    from batchpilot.controllers.step_cost import StepCostModel

    model = StepCostModel(refit_every=1)
    for decode in range(1, 100):  # decode-only steps: the prefill term cannot be told apart
        model.add(StepStats(decode, 0, decode, 0.01 + 0.001 * decode, 0.5, 0, decode, 0))
    assert model.cost() is None


def test_step_cost_model_fits_from_the_first_two_prefill_steps():
    # All requests at once: a couple of 512-token prefill steps, then decodes (one admission per finish).
    from batchpilot.controllers.step_cost import StepCostModel

    model = StepCostModel()
    model.add(StepStats(12, 512, 0, 0.01 + 0.0003 * 512, 0.1, 0, 12, 50))
    for decode in range(12, 20):
        model.add(StepStats(decode, 0, decode, 0.01 + 0.001 * decode, 0.5, 0, decode, 50))
    assert model.cost() is None  # one prefill step: its term is not yet told apart from noise
    model.add(StepStats(20, 300, 19, 0.01 + 0.0003 * 300 + 0.001 * 19, 0.5, 0, 20, 49))
    for decode in range(20, 24):  # a first fit is tried every cold_refit_every steps
        model.add(StepStats(decode, 0, decode, 0.01 + 0.001 * decode, 0.5, 0, decode, 49))
    cost = model.cost()
    assert cost is not None
    assert cost.per_prefill_s == pytest.approx(0.0003, rel=1e-6) and cost.fixed_s == pytest.approx(0.01, rel=1e-6)


def test_step_cost_model_keeps_its_fit_through_a_long_decode_only_phase():
    # Long outputs admit a prompt every few hundred steps: the window then holds decode-only steps
    # and cannot fit the prefill term again. Losing the fit then turned the cost rule off exactly
    # where it decides (the simulator's H100 phase shift lost 15% of capacity to it).
    from batchpilot.controllers.step_cost import StepCostModel

    model = StepCostModel(window=64, refit_every=1)
    for i in range(64):
        prefill, decode = (200 if i % 2 else 0), 4 + i % 7
        model.add(StepStats(decode, prefill, decode, 0.01 + 0.0001 * prefill + 0.001 * decode, 0.5, 0, decode, 0))
    fitted = model.cost()
    assert fitted.per_prefill_s == pytest.approx(0.0001, rel=0.01)
    for decode in range(1, 200):
        model.add(StepStats(decode, 0, decode, 0.01 + 0.001 * decode, 0.5, 0, decode, 0))
    kept = model.cost()
    assert kept is not None and kept.per_prefill_s == pytest.approx(fitted.per_prefill_s, rel=1e-6)


def test_step_cost_model_takes_no_fit_from_steps_that_confound_its_terms():
    # The first steps of a measured run (lockstep, output shift, the cost policy): three slow prefill
    # steps (the first ones of a process run from cold caches) and then decode-only steps that all hold
    # 36 rows. Least squares reads the prefill steps' falling times as a negative per-row cost and a
    # fixed term several times the true ~15 ms, which made the cost rule admit past every overflow.
    from batchpilot.controllers.step_cost import StepCostModel

    steps = [StepStats(12, 512, 0, 0.1707, 0.1, 0, 12, 55), StepStats(23, 501, 11, 0.1522, 0.2, 0, 23, 44),
             StepStats(34, 490, 22, 0.1317, 0.3, 0, 34, 33), StepStats(36, 158, 33, 0.0671, 0.4, 0, 36, 31)]
    steps += [StepStats(36, 0, 36, 0.024 + 0.00005 * i + (0.006 if i % 6 == 0 else 0), 0.5, 0, 36, 31)
              for i in range(60)]
    x = np.array([(1.0, s.num_prefill_tokens, s.num_decode_tokens) for s in steps])
    plain = np.linalg.lstsq(x, np.array([s.step_time_s for s in steps]), rcond=None)[0]
    assert plain[0] > 0.05 and plain[2] < 0  # what was taken before (clipped to 0 per row)
    model = StepCostModel(refit_every=1)
    for s in steps:
        model.add(s)
    assert model.cost() is None
    # Once rows finish and the batch shrinks, the decode steps tell the fixed term from the per-row one.
    for i, rows in enumerate([30] * 20 + [24] * 20 + [16] * 20):
        model.add(StepStats(rows, 0, rows, 0.015 + 0.0003 * rows + (0.002 if i % 5 == 0 else 0), 0.5, 0, rows, 0))
    cost = model.cost()
    assert cost is not None and 0.010 < cost.fixed_s < 0.022 and cost.per_decode_s > 0


def test_overflow_is_admitted_only_when_the_batch_gain_pays_the_recompute():
    from batchpilot.controllers.peak import PeakBound
    from batchpilot.controllers.step_cost import StepCost

    bound = PeakBound(0.05)
    # 1600 tokens; each request holds 100 tokens and runs exactly 300 more (25 blocks at its peak): 4 fit.
    # A 5th overflows ~221 steps from now, all 10 at once from step ~61: worth it only if recompute is cheap.
    v = states_view([], [(100, 0, 300, True)] * 10, free=100)
    assert bound.admissible(v, 10) == 4
    cheap_recompute = StepCost(fixed_s=0.02, per_prefill_s=1e-5, per_decode_s=1e-4)  # a GPU's shape
    assert bound.admissible(v, 10, cheap_recompute) == 10
    dear_recompute = StepCost(fixed_s=0.02, per_prefill_s=1e-2, per_decode_s=1e-4)
    assert bound.admissible(v, 10, dear_recompute) == 4
    v17 = states_view([], [(100, 0, 300, True)] * 20, free=100)
    assert bound.admissible(v17, 20, cheap_recompute) == 14  # a 15th does not fit now: 15 x 112 > 1600


def test_cost_mode_reads_the_pool_until_lengths_are_known():
    c = MemoryController("cost", max_num_seqs=100)
    # No request has finished and none has a known length: the block heuristic's 100 * .95 / 10 = 9.
    v = states_view([(160, 10, 512)] * 6, [(100, 0, 512)] * 10, free=40)
    assert c.limit(v) == 9
    # Known lengths (ignore_eos with max_tokens): the peak of the admitted set decides.
    exact = states_view([], [(100, 0, 300, True)] * 10, free=100)
    assert c.limit(exact) == 4


def test_peak_bound_answers_again_only_when_its_inputs_change(monkeypatch):
    from batchpilot.controllers import memory
    from batchpilot.controllers.base import StepStats

    c = MemoryController("peak", max_num_seqs=100)
    calls = []
    real = c.peak.admissible
    monkeypatch.setattr(c.peak, "admissible", lambda *a, **k: calls.append(1) or real(*a, **k))
    # 1600 tokens: each request's peak is 25 blocks, so 4 of 10 fit (the test above).
    v = states_view([], [(100, 0, 300, True)] * 10, free=100)
    quiet = StepStats(0, 0, 0, 0.01, 0.0, 0, 0, 10)
    for _ in range(memory.PEAK_REFRESH_STEPS):  # the same running set and queue: one answer, reused
        assert c.limit(v) == 4
        c.observe(quiet)
    assert len(calls) == 1
    assert c.limit(v) == 4 and len(calls) == 2  # and answered again once it is PEAK_REFRESH_STEPS old
    running = states_view([(150, 50, 300, True)] * 4, [(100, 0, 300, True)] * 6, free=60)
    assert c.limit(running) == 4 and len(calls) == 3  # the running set changed
    c.observe(StepStats(4, 0, 4, 0.01, 0.5, 0, 4, 6, finished_lens=(400,), finished_output_lens=(300,)))
    assert c.limit(running) == 4 and len(calls) == 4  # a request finished
    c.observe(StepStats(4, 0, 4, 0.01, 0.5, 1, 4, 6))
    c.limit(running)
    assert len(calls) == 5  # a request was preempted
