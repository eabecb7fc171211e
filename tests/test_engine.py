"""The engine on the real default model: preemption keeps greedy outputs, async streams stay apart."""

import asyncio

import pytest

from batchpilot import LLM, SamplingParams
from batchpilot.engine.async_engine import AsyncEngine
from batchpilot.engine.scheduler import RequestRejectedError

PROMPTS = [f"Count from {i} to {i + 20}:" for i in range(8)] + ["Tell me about the ocean.", "def sort(xs):"]


def test_preemption_does_not_change_greedy_outputs(llm_fp32, default_model_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ample = [o.outputs[0].token_ids for o in llm_fp32.generate(PROMPTS, params)]
    # 10 requests of ~10 + 24 tokens need ~30 blocks of 16 at once; 12 blocks force a static limit to preempt.
    tight = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=12, batch_controller="static")
    outs = tight.generate(PROMPTS, params)
    assert tight.engine.scheduler.num_preemptions_total > 0
    assert sum(o.num_preemptions for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == ample
    assert tight.engine.scheduler.kv.pool.num_free_blocks == 12
    # The default controller knows these lengths (ignore_eos with max_tokens): it admits what fits, never preempts.
    default = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=12)
    assert [o.outputs[0].token_ids for o in default.generate(PROMPTS, params)] == ample
    assert default.engine.scheduler.num_preemptions_total == 0
    assert default.engine.scheduler.kv.pool.num_free_blocks == 12


def test_too_long_prompt_is_rejected_at_add(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=4)  # 64 tokens
    with pytest.raises(RequestRejectedError, match="64"):
        llm.engine.add_request(list(range(100, 200)), SamplingParams())
    assert not llm.engine.has_unfinished_requests()


def test_counters_track_requests_and_tokens(llm_fp32):
    c = llm_fp32.engine.counters
    before = (c.num_requests_finished, c.num_generation_tokens)
    llm_fp32.generate(["a", "b"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert c.num_requests_finished - before[0] == 2
    assert c.num_generation_tokens - before[1] == 6


def test_fifty_concurrent_streams_get_their_own_tokens_in_order(llm_fp32):
    prompts = [f"Item {i}: the number {i * 7} is" for i in range(50)]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=8 + i % 5, ignore_eos=True) for i in range(50)]
    expected = [o.outputs[0].token_ids for o in llm_fp32.generate(prompts, params)]

    async def main():
        engine = AsyncEngine(llm_fp32.engine)

        async def collect(i):
            tokens, text, last = [], "", None
            async for out in engine.generate(prompts[i], params[i], request_id=f"s{i}"):
                assert out.request_id == f"s{i}"
                tokens += out.outputs[0].token_ids
                text += out.outputs[0].text
                last = out
            assert last.finished and last.outputs[0].finish_reason == "length"
            return tokens, text

        try:
            return await asyncio.gather(*(collect(i) for i in range(50)))
        finally:
            await engine.stop()

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    tok = llm_fp32.tokenizer
    assert [text for _, text in results] == [tok.decode(t) for t in expected]
    assert llm_fp32.engine.scheduler.kv.pool.num_used_blocks == 0


def test_leaving_a_stream_aborts_the_request(llm_fp32):
    async def main():
        engine = AsyncEngine(llm_fp32.engine)
        try:
            gen = engine.generate("Once upon a time", SamplingParams(max_tokens=500, ignore_eos=True))
            async for _ in gen:
                break
            await gen.aclose()
            for _ in range(100):
                if not llm_fp32.engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(RequestRejectedError):
                async for _ in engine.generate("", SamplingParams()):
                    pass
        finally:
            await engine.stop()

    asyncio.run(main())
    assert not llm_fp32.engine.has_unfinished_requests()
    assert llm_fp32.engine.scheduler.kv.pool.num_used_blocks == 0
