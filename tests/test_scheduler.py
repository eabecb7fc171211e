"""CPU-only scheduler tests with a fake executor (no model), in the style of vLLM's v1 core tests."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.engine.request import Request, RequestStatus
from batchpilot.engine.scheduler import RequestRejectedError
from batchpilot.sampling_params import SamplingParams
from tests.helpers import assert_blocks_consistent, fake_output, make_requests, make_scheduler


def run_step(sched, token=7):
    out = sched.schedule()
    sched.update_from_output(out, fake_output(out, token))
    assert_blocks_consistent(sched)
    return out


def test_token_budget_and_limit_are_never_exceeded():
    sched = make_scheduler(num_blocks=200, block_size=4, max_num_seqs=3, max_num_batched_tokens=10)
    for r in make_requests(5, prompt_len=8, max_tokens=4):
        sched.add_request(r)
    out = sched.schedule()
    # 8 tokens for r0, then 10 - 8 = 2 tokens of r1's prompt (chunked), r2 has no budget left.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 8), ("r1", 2)]
    assert [s.sample for s in out.scheduled] == [True, False]
    sched.update_from_output(out, fake_output(out))
    while sched.has_unfinished():
        out = run_step(sched)
        assert out.num_tokens <= 10
        assert len(sched.running) <= 3


def test_chunked_prefill_keeps_decodes_going():
    sched = make_scheduler(num_blocks=200, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    short, long_ = make_requests(1, 4, 20, "s")[0], make_requests(1, 40, 4, "l")[0]
    sched.add_request(short)
    run_step(sched)
    sched.add_request(long_)
    for _ in range(5):  # the long prompt takes 40 / 7 steps; the short one decodes in each of them
        before = len(short.output_token_ids)
        out = run_step(sched)
        assert len(short.output_token_ids) == before + 1
        assert sum(s.num_new_tokens for s in out.scheduled if s.request is long_) == 7


def test_blocks_are_freed_when_requests_finish():
    sched = make_scheduler(num_blocks=20, block_size=4)
    for r in make_requests(4, prompt_len=6, max_tokens=5):
        sched.add_request(r)
    while sched.has_unfinished():
        run_step(sched)
    assert sched.kv.pool.num_free_blocks == 20


def test_preemption_frees_the_newest_and_requeues_it_first():
    # 6 blocks of 4 tokens = 24 tokens. Three prompts of 7 tokens need 2 blocks each: pool full.
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=8)
    reqs = make_requests(3, prompt_len=7, max_tokens=10)
    for r in reqs:
        sched.add_request(r)
    run_step(sched)  # prefill: 7 tokens each in 2 blocks (8 slots); pool full
    assert sched.kv.pool.num_free_blocks == 0
    assert not run_step(sched).preempted_ids  # decode position 7: the 8th slot, still 2 blocks
    out = run_step(sched)  # position 8 needs a third block for r0 -> preempt r2 (newest)
    assert out.preempted_ids == ["r2"]
    assert reqs[2].status == RequestStatus.PREEMPTED and reqs[2].num_computed_tokens == 0
    assert sched.waiting[0] is reqs[2]
    assert reqs[2].output_token_ids == [7, 7]  # kept: recompute replays prompt + output
    while sched.has_unfinished():
        run_step(sched)
    assert all(len(r.output_token_ids) == 10 for r in reqs)
    assert sched.num_preemptions_total >= 1
    assert sched.kv.pool.num_free_blocks == 6


@pytest.mark.parametrize("where", ["waiting", "prefill", "decode", "preempted"])
def test_abort_frees_everything(where):
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=5)
    reqs = make_requests(3, prompt_len=7, max_tokens=10)
    for r in reqs:
        sched.add_request(r)
    target = reqs[2]
    if where == "prefill":
        run_step(sched)  # budget 5: r0 is mid-prefill
        target = reqs[0]
        assert not target.is_decoding and target.status == RequestStatus.RUNNING
    elif where == "decode":
        for _ in range(3):
            run_step(sched)
        target = reqs[0]
        assert target.is_decoding
    elif where == "preempted":
        while target.status != RequestStatus.PREEMPTED:
            run_step(sched)
    sched.finish_requests([target.request_id], RequestStatus.FINISHED_ABORTED)
    assert target.status == RequestStatus.FINISHED_ABORTED
    assert target.request_id not in sched.kv.block_tables
    assert_blocks_consistent(sched)
    while sched.has_unfinished():
        run_step(sched)
    assert sched.kv.pool.num_free_blocks == 6


def test_stop_token_and_eos_finish_requests():
    sched = make_scheduler()
    eos = Request("e", [1, 2, 3], SamplingParams(max_tokens=10), 0.0, eos_token_ids=(7,))
    stop = Request("s", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=[7]), 0.0)
    ignore = Request("i", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), 0.0, eos_token_ids=(7,))
    for r in (eos, stop, ignore):
        sched.add_request(r)
    while sched.has_unfinished():
        run_step(sched, token=7)
    assert eos.status == stop.status == RequestStatus.FINISHED_STOPPED
    assert ignore.status == RequestStatus.FINISHED_LENGTH and len(ignore.output_token_ids) == 3


def test_any_of_several_eos_ids_finishes_a_request():
    sched = make_scheduler()
    req = Request("m", [1, 2, 3], SamplingParams(max_tokens=10), 0.0, eos_token_ids=(7, 9))
    sched.add_request(req)
    for token in (5, 9):
        run_step(sched, token=token)
    assert req.status == RequestStatus.FINISHED_STOPPED and req.output_token_ids == [5, 9]


def test_prompts_that_can_never_fit_are_rejected():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(RequestRejectedError, match="16"):
        sched.add_request(make_requests(1, prompt_len=16, max_tokens=1)[0])  # pool holds 16 tokens
    with pytest.raises(RequestRejectedError, match="empty"):
        sched.add_request(Request("x", [], SamplingParams(), 0.0))
    small_ctx = make_scheduler(num_blocks=100, block_size=4, max_model_len=10)
    with pytest.raises(RequestRejectedError):
        small_ctx.add_request(make_requests(1, prompt_len=10, max_tokens=1)[0])


def test_generation_stops_at_the_context_limit():
    sched = make_scheduler(num_blocks=100, block_size=4, max_model_len=12)
    req = make_requests(1, prompt_len=8, max_tokens=100)[0]
    sched.add_request(req)
    while sched.has_unfinished():
        run_step(sched)
    assert req.num_tokens == 12 and req.status == RequestStatus.FINISHED_LENGTH


def test_no_request_starves_under_a_tight_limit():
    sched = make_scheduler(num_blocks=100, block_size=4, max_num_seqs=2)
    reqs = make_requests(10, prompt_len=5, max_tokens=3)
    for r in reqs:
        sched.add_request(r)
    finish_order = []
    while sched.has_unfinished():
        run_step(sched)
        finish_order += [r.request_id for r in reqs if r.status.finished and r.request_id not in finish_order]
    assert finish_order == [f"r{i}" for i in range(10)]  # FCFS: first in, first served


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(4, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(1, 32),
    reqs=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 20)), min_size=1, max_size=12),
    aborts=st.lists(st.integers(0, 11), max_size=3),
)
def test_random_workloads_end_with_every_block_free(num_blocks, block_size, max_num_seqs, budget, reqs, aborts):
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=budget)
    added = []
    for i, (plen, max_tokens) in enumerate(reqs):
        r = Request(f"r{i}", list(range(1, plen + 1)),
                    SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0)
        try:
            sched.add_request(r)
            added.append(r)
        except RequestRejectedError:
            assert plen >= sched.max_model_len
    steps = 0
    while sched.has_unfinished():
        out = run_step(sched)
        assert out.num_tokens <= budget
        assert len(sched.running) <= max_num_seqs
        steps += 1
        if steps in (2, 5):
            sched.finish_requests([f"r{i}" for i in aborts], RequestStatus.FINISHED_ABORTED)
        assert steps < 10_000, "scheduler made no progress"
    assert sched.kv.pool.num_free_blocks == num_blocks
    assert not sched.kv.block_tables
    for r in added:
        assert r.status.finished
        if r.status == RequestStatus.FINISHED_LENGTH:
            cap = min(r.sampling_params.max_tokens, sched.max_model_len - r.num_prompt_tokens)
            assert len(r.output_token_ids) == cap
