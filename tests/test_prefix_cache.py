"""Prefix caching: the pool's references and eviction order, the scheduler's reuse of cached
blocks, the memory controller's view of shared blocks, and greedy outputs with caching on and off."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot import LLM, SamplingParams
from batchpilot.config import ControllerConfig, SchedulerConfig
from batchpilot.controllers import make_controller
from batchpilot.engine.block_pool import BlockPool, KVCacheManager, block_hash
from batchpilot.engine.engine import LLMEngine
from batchpilot.engine.request import Request, RequestStatus
from batchpilot.engine.scheduler import Scheduler
from tests.helpers import assert_blocks_consistent, fake_output, make_scheduler


def request(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), 0.0)


def step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    assert_blocks_consistent(sched)
    sched.update_from_output(out, fake_output(out, token))
    assert_blocks_consistent(sched)
    return out


def test_block_names_chain_their_parents():
    a = block_hash(b"", [1, 2, 3, 4])
    assert a == block_hash(b"", [1, 2, 3, 4]) != block_hash(b"", [1, 2, 3, 5])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(b"", [0, 2, 3, 4]), [5, 6, 7, 8])


def test_free_blocks_are_evicted_least_recently_freed_first_tail_first():
    pool = BlockPool(4, 2)
    kv = KVCacheManager(pool)
    a, b = request("a", [1, 2, 3, 4, 5]), request("b", [9, 9, 9, 9, 9])
    table_a = kv.allocate_slots("a", 5)
    kv.cache_computed(a, 4)  # two full blocks named
    kv.free("a")  # tail first: a's 3rd block, then 2nd, then 1st join the free queue
    assert pool.num_free_blocks == 4 and pool.num_cached_free_blocks == 2
    # Never-used block 3 goes first, then a's tail (unnamed), then a's second block: its prefix
    # (the first block) survives longest.
    taken = kv.allocate_slots("b", 5)
    assert taken == [3, table_a[2], table_a[1]]
    assert pool.num_cached_free_blocks == 1
    assert kv.cached_prefix(request("c", [1, 2, 3, 4, 5, 6])) == [table_a[0]]
    kv.cache_computed(b, 4)
    kv.free("b")
    assert kv.cached_prefix(request("d", [1, 2, 3, 4, 77])) == [table_a[0]]


def test_a_shared_system_prompt_is_prefilled_once():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    system = list(range(1000, 1030))  # 30 tokens: 7 full blocks
    reqs = [request(f"r{i}", system + [i, i + 1, i + 2]) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    out = step(sched)
    # The first request computes all 33 tokens; the others find 7 named blocks (28 tokens) and
    # compute the rest, in the same step (the step writes every new K/V before any attention).
    assert [s.start for s in out.scheduled] == [0, 28, 28, 28]
    assert out.num_prefill_tokens == 33 + 3 * 5
    assert [r.num_cached_tokens for r in reqs] == [0, 28, 28, 28]
    assert sched.kv.pool.num_shared_blocks == 7 and sched.kv.pool.num_saved_blocks == 21
    assert (sched.kv.num_prefix_queries, sched.kv.num_prefix_hits) == (4 * 33, 3 * 28)
    while sched.has_unfinished():
        step(sched)
    assert sched.kv.pool.num_free_blocks == 64 and sched.kv.pool.num_shared_blocks == 0


def test_n_identical_prompts_count_their_prefill_once():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    prompt = list(range(500, 541))  # 41 tokens: 10 full blocks, the last token always computed
    for k in range(4):
        sched.add_request(request(f"n{k}", prompt))
    out = step(sched)
    assert out.num_prefill_tokens == 41 + 3 * 1
    assert [s.sample for s in out.scheduled] == [True] * 4


def test_a_full_hit_still_computes_the_last_token():
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=64)
    sched.add_request(request("a", list(range(1, 9)), max_tokens=1))  # 8 tokens: 2 full blocks
    step(sched)
    assert not sched.has_unfinished()
    again = request("b", list(range(1, 9)), max_tokens=1)
    sched.add_request(again)
    out = step(sched)
    assert (out.scheduled[0].start, out.scheduled[0].num_new_tokens) == (4, 4)  # the second block is recomputed
    assert again.num_cached_tokens == 4


def test_preemption_keeps_cached_blocks_of_others_and_recovers_its_own():
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    system = list(range(2000, 2008))  # 2 blocks shared by everyone
    reqs = [request(f"p{i}", system + [i] * 4, max_tokens=12) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    preempted = 0
    while sched.has_unfinished():
        preempted += len(step(sched).preempted_ids)
    assert preempted > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 12 for r in reqs)
    assert sched.kv.pool.num_free_blocks == 8 and sched.kv.pool.num_shared_blocks == 0


def test_caching_off_computes_every_token():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=256, prefix_caching=False)
    for k in range(3):
        sched.add_request(request(f"x{k}", list(range(1, 21))))
    out = step(sched)
    assert out.num_prefill_tokens == 60 and sched.kv.pool.num_shared_blocks == 0
    assert sched.kv.num_prefix_queries == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "abort", "step", "step"]), st.integers(0, 10**6)),
                min_size=1, max_size=60))
def test_random_adds_aborts_and_preemptions_keep_references_consistent(ops):
    sched = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=6, max_num_batched_tokens=24)
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5] * 12]
    ids = 0
    for op, x in ops:
        rng = random.Random(x)
        if op == "add":
            tail = [rng.randint(10, 20) for _ in range(rng.randint(0, 6))]
            prompt = rng.choice(prefixes)[: rng.randint(1, 12)] + tail
            sched.add_request(request(f"q{ids}", prompt, max_tokens=rng.randint(1, 10)))
            ids += 1
        elif op == "abort" and sched.requests:
            sched.finish_requests([rng.choice(sorted(sched.requests))], RequestStatus.FINISHED_ABORTED)
            assert_blocks_consistent(sched)
        else:
            step(sched, token=rng.choice([7, 8]))
    while sched.has_unfinished():
        step(sched)
    pool = sched.kv.pool
    assert pool.num_free_blocks == pool.num_blocks and pool.ref_counts == [0] * pool.num_blocks
    assert pool.num_shared_blocks == pool.num_saved_blocks == 0
    assert pool.num_cached_free_blocks == len(pool._hash_by_block) == len(pool._block_by_hash)


class _FakeExecutor:
    def execute(self, sched_out):
        return fake_output(sched_out)


def _max_running(prefix_caching: bool, memory_mode: str) -> tuple[int, int]:
    """Most sequences running at once, and preemptions, for 24 requests sharing a 64-token
    system prompt on a pool of 40 blocks of 4 (each request alone would need 18-19 blocks)."""
    kv = KVCacheManager(BlockPool(40, 4), enable_prefix_caching=prefix_caching)
    controller = make_controller(ControllerConfig(name="memory", memory_mode=memory_mode, max_num_seqs=64))
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256), kv, controller, 1024)
    engine = LLMEngine(sched, _FakeExecutor(), tokenizer=None)
    system = list(range(3000, 3064))
    for i in range(24):
        engine.add_request(system + [i, i], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    most = 0
    while engine.has_unfinished_requests():
        engine.step_tokens()
        assert_blocks_consistent(sched)
        most = max(most, len(sched.running))
    return most, sched.num_preemptions_total


def test_the_memory_controllers_admit_more_when_a_prefix_is_shared():
    # The peak bound (and the cost mode, the default, which uses it) predicts each sequence's growth:
    # it admits more and never preempts.
    for mode in ("peak", "cost"):
        shared, preemptions = _max_running(True, mode)
        assert shared > _max_running(False, mode)[0] and preemptions == 0, mode
    # The blocks and CLT bounds have no information at a cold start: the pool alone gates the first
    # admissions (all 24 fit beside one copy of the prefix), and growth then preempts some.
    for mode in ("blocks", "clt"):
        assert _max_running(True, mode)[0] > 2 * _max_running(False, mode)[0], mode


def test_greedy_outputs_equal_with_caching_on_and_off(default_model_dir):
    system = "You are a helpful assistant who answers briefly and precisely. " * 3
    prompts = [system + q for q in ("What is 2+2?", "Name a color.", "Count to five.", "Say hi.")]
    prompts += [prompts[0], "Tell me about the ocean.", system]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    off = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in off.generate(prompts, params)]
    # 10 blocks of 16 tokens: the shared prompt is cached, and requests are preempted.
    on = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=10, batch_controller="static")
    outs = on.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert on.engine.scheduler.num_preemptions_total > 0
    assert sum(o.num_cached_tokens for o in outs) > 0
    kv = on.engine.scheduler.kv
    assert kv.num_prefix_hits > 0 and kv.pool.num_free_blocks == 10
    # The second round finds every prompt's full blocks cached.
    again = on.generate(prompts[:4], params)
    assert [o.outputs[0].token_ids for o in again] == expected[:4]
    assert all(o.num_cached_tokens >= 16 * ((len(o.prompt_token_ids) - 1) // 16) - 16 for o in again)
