"""Fault injection: a step that raises fails only its own batch; steps that keep failing kill the
loop, which says so once (the server then exits for its supervisor)."""

import asyncio

import pytest

from batchpilot.engine.async_engine import (
    MAX_CONSECUTIVE_FAILED_STEPS,
    AsyncEngine,
    EngineDeadError,
    RequestFailedError,
)
from batchpilot.engine.engine import LLMEngine
from batchpilot.sampling_params import SamplingParams
from tests.helpers import assert_blocks_consistent, fake_output, make_scheduler


class FlakyExecutor:
    """Answers like a model, except that the steps numbered in `failing` raise (all of them
    from `fail_from` on)."""

    def __init__(self, failing: set[int] = frozenset(), fail_from: int | None = None):
        self.failing, self.fail_from, self.steps = failing, fail_from, 0

    def execute(self, sched_out):
        self.steps += 1
        if self.steps in self.failing or (self.fail_from is not None and self.steps >= self.fail_from):
            raise RuntimeError(f"injected fault in step {self.steps}")
        return fake_output(sched_out)


def make_engine(executor: FlakyExecutor, max_num_seqs: int) -> LLMEngine:
    return LLMEngine(make_scheduler(num_blocks=32, block_size=4, max_num_seqs=max_num_seqs), executor, tokenizer=None)


async def run(engine: AsyncEngine, prompt: list[int], max_tokens: int) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    try:
        async for _ in engine.generate(prompt, params):
            pass
        return "done"
    except RequestFailedError:
        return "failed"
    except EngineDeadError:
        return "dead"


def test_a_failed_step_fails_its_batch_and_the_engine_goes_on():
    engine = make_engine(FlakyExecutor(failing={3}), max_num_seqs=2)
    async_engine = AsyncEngine(engine)

    async def main():
        # two run at once (the limit); the third waits for a place and is not in the failed batch
        first = await asyncio.gather(*(run(async_engine, [10 * i + 1, 10 * i + 2, 10 * i + 3], 6) for i in range(3)))
        after = await run(async_engine, [7, 7, 7, 7, 7], 4)
        await async_engine.stop()
        return first, after

    first, after = asyncio.run(main())
    assert first == ["failed", "failed", "done"] and after == "done"
    assert async_engine.error is None
    sched = engine.scheduler
    assert not sched.has_unfinished() and sched.kv.pool.num_free_blocks == 32
    assert_blocks_consistent(sched)


def test_steps_that_keep_failing_kill_the_loop_once():
    engine = make_engine(FlakyExecutor(fail_from=1), max_num_seqs=1)
    deaths: list[BaseException] = []
    async_engine = AsyncEngine(engine, on_dead=deaths.append)

    async def main():
        outcomes = await asyncio.gather(*(run(async_engine, [i + 1, i + 2], 3) for i in range(5)))
        with pytest.raises(EngineDeadError):
            await run_raw(async_engine)
        await async_engine.stop()
        return outcomes

    async def run_raw(e: AsyncEngine):
        async for _ in e.generate([1, 2], SamplingParams(max_tokens=2)):
            pass

    outcomes = asyncio.run(main())
    # one request per step: the first steps fail their own request, the last one kills the loop
    assert outcomes[: MAX_CONSECUTIVE_FAILED_STEPS - 1] == ["failed"] * (MAX_CONSECUTIVE_FAILED_STEPS - 1)
    assert set(outcomes[MAX_CONSECUTIVE_FAILED_STEPS - 1:]) == {"dead"}
    assert len(deaths) == 1 and async_engine.error is deaths[0]
