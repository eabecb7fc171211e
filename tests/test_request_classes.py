"""Per-request priorities and SLA classes: queue order, starvation bound, the scheduler's view of
the active classes, and the per-class SLA loop on a synthetic latency curve."""

from __future__ import annotations

import numpy as np
import pytest

from batchpilot import LLM, SamplingParams
from batchpilot.config import ControllerConfig, SchedulerConfig, SLAClass
from batchpilot.controllers import ClassSLAController, make_controller
from batchpilot.controllers.sla import SLAController
from batchpilot.controllers.static import StaticController
from batchpilot.engine.block_pool import BlockPool, KVCacheManager
from batchpilot.engine.request import Request
from batchpilot.engine.scheduler import RequestRejectedError, Scheduler
from tests.helpers import assert_blocks_consistent, fake_output
from tests.test_controllers import stats, view

INTERACTIVE = SLAClass("interactive", tpot_ms=40, ttft_ms=2000)
BATCH = SLAClass("batch")


def scheduler(limit: int = 1, policy: str = "priority", aging_s: float = 10.0, num_blocks: int = 256) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=64, scheduling_policy=policy, priority_aging_s=aging_s,
                             sla_classes=(INTERACTIVE, BATCH))
    return Scheduler(config, KVCacheManager(BlockPool(num_blocks, 4)), StaticController(limit), 1024)


def add(sched: Scheduler, rid: str, arrival: float, priority: int = 0, sla: str | None = None,
        max_tokens: int = 2) -> Request:
    req = Request(rid, [hash(rid) % 1000 + 1 + t for t in range(4)],
                  SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), arrival,
                  priority=priority, sla_class=sched.sla_class(sla))
    sched.add_request(req)
    return req


def admission_order(sched: Scheduler, steps: int = 100) -> list[str]:
    order = []
    for _ in range(steps):
        out = sched.schedule()
        order += [r.request_id for r in out.started]
        sched.update_from_output(out, fake_output(out))
        assert_blocks_consistent(sched)
        if not sched.has_unfinished():
            break
    return order


def test_lower_priority_values_run_first_then_arrival_order():
    sched = scheduler()
    for rid, arrival, priority in (("a", 0.0, 2), ("b", 0.1, 0), ("c", 0.2, 1), ("d", 0.3, 0), ("e", 0.4, -1)):
        add(sched, rid, arrival, priority)
    assert admission_order(sched) == ["e", "b", "d", "c", "a"]


def test_fcfs_refuses_a_priority_and_unknown_classes_are_refused():
    sched = scheduler(policy="fcfs")
    with pytest.raises(RequestRejectedError, match="--scheduling-policy priority"):
        add(sched, "a", 0.0, priority=1)
    with pytest.raises(RequestRejectedError, match="unknown SLA class 'gold'.*interactive, batch"):
        sched.sla_class("gold")
    assert not sched.has_unfinished()


def test_a_worse_priority_waits_a_bounded_time_under_a_steady_stream_of_better_ones():
    # One sequence at a time; a priority-0 request arrives every step (1 s) and each needs 2 steps,
    # so the queue grows without end: without aging the priority-1 request would never run.
    sched = scheduler(aging_s=10.0)
    add(sched, "late", 0.0, priority=1)
    admitted_before: list[str] = []
    for t in range(200):
        add(sched, f"p{t}", float(t))
        out = sched.schedule()
        started = [r.request_id for r in out.started]
        sched.update_from_output(out, fake_output(out))
        if "late" in started:
            break
        admitted_before += started
    else:
        pytest.fail("the priority-1 request never ran")
    # key: arrival + priority x aging + aging (no TTFT target) = 20; a priority-0 request's is t + 10:
    # exactly those that arrived before t = 10 go first (at equal keys, the one queued first)
    assert admitted_before == [f"p{t}" for t in range(10)]


def test_a_strict_class_is_admitted_ahead_of_a_loose_one_at_equal_arrival():
    sched = scheduler(policy="fcfs")
    add(sched, "batch-job", 0.0, sla="batch")
    add(sched, "chat", 0.0, sla="interactive")
    # a TTFT target is a deadline (arrival + 2 s): a later interactive request still goes before a
    # batch request that has not waited its aging time
    add(sched, "chat-later", 1.5, sla="interactive")
    add(sched, "batch-later", 1.5, sla="batch")
    assert admission_order(sched) == ["chat", "chat-later", "batch-job", "batch-later"]


def test_preemption_takes_the_request_latest_in_queue_order():
    # 6 blocks of 4: two 4-token prompts fit, their growth does not; the batch request is the victim
    # even though it was admitted first
    sched = scheduler(limit=2, policy="fcfs", num_blocks=6)
    add(sched, "batch-job", 0.0, sla="batch", max_tokens=10)
    out = sched.schedule()
    sched.update_from_output(out, fake_output(out))
    add(sched, "chat", 0.5, sla="interactive", max_tokens=10)
    preempted = []
    for _ in range(30):
        out = sched.schedule()
        preempted += out.preempted_ids
        sched.update_from_output(out, fake_output(out))
        assert_blocks_consistent(sched)
    assert preempted and set(preempted) == {"batch-job"}


def test_the_view_names_the_strictest_target_of_unfinished_requests():
    sched = scheduler(limit=4, policy="fcfs")
    assert sched.view().sla_tpot_ms is None and not sched.view().has_classless
    add(sched, "b", 0.0, sla="batch", max_tokens=3)
    assert sched.view().sla_tpot_ms is None and not sched.view().has_classless
    add(sched, "i", 0.0, sla="interactive", max_tokens=1)
    add(sched, "none", 0.0, max_tokens=3)
    v = sched.view()
    assert v.sla_tpot_ms == 40 and v.has_classless
    out = sched.schedule()
    sched.update_from_output(out, fake_output(out))  # the interactive request finishes (one token)
    assert sched.view().sla_tpot_ms is None and sched.view().has_classless
    admission_order(sched)
    assert not sched.view().has_classless


def linear_ms(b: int) -> float:
    return 10 + 0.5 * b  # D(b): 40 ms at b = 60


def test_the_strict_class_stays_in_band_while_the_loose_class_fills():
    """A closed loop on D(b) = 10 + 0.5 b ms: while interactive requests (TPOT 40 ms) are active
    the batch settles where D(b) is inside 40 +- 4 ms; while only batch requests (no target) run
    it fills to B_max; when interactive requests return it comes back into the band."""
    c = ClassSLAController(None, (40.0,), lambda t: SLAController(t, 4, window=4, max_num_seqs=200, percentile=0),
                           max_num_seqs=200)
    rng = np.random.default_rng(3)
    running: list[int] = []
    history = []
    for t in range(900):
        strict_active = not 300 <= t < 600
        v = view(running=len(running), waiting=500, decoding=len(running))
        v = type(v)(**{**v.__dict__, "sla_tpot_ms": 40.0 if strict_active else None, "has_classless": False})
        limit = c.limit(v)
        while len(running) < limit:
            running.append(int(rng.integers(15, 45)))
        b = len(running)
        c.observe(stats(b, linear_ms(b) / 1000))
        history.append((b, linear_ms(b), c.trace["sla_target_ms"]))
        running = [r - 1 for r in running if r > 1]
    strict = history[60:300] + history[660:900]
    assert sum(36 <= ms <= 44 for _, ms, _ in strict) / len(strict) >= 0.9
    assert all(target == 40.0 for _, _, target in strict)
    assert min(b for b, _, _ in history[360:600]) >= 190  # filled while only the loose class ran
    assert history[450][2] == 0.0  # no target in force


def test_make_controller_runs_one_loop_per_class_target_beside_the_server_wide_one():
    c = make_controller(ControllerConfig(sla_tpot_ms=100), class_tpots_ms=(40.0, 60.0))
    assert sorted(c.sla.loops) == [40.0, 60.0, 100.0]
    v = view(running=0, waiting=1, decoding=0)
    c.limit(type(v)(**{**v.__dict__, "sla_tpot_ms": None, "has_classless": True}))
    assert c.sla.target_ms == 100.0  # requests without a class hold the server-wide target
    c.limit(type(v)(**{**v.__dict__, "sla_tpot_ms": 60.0, "has_classless": True}))
    assert c.sla.target_ms == 60.0


def test_bad_class_definitions_name_the_flag():
    for text, match in (("x:tpot=fast", "tpot must be a number"), ("x:speed=1", "expected NAME:tpot=MS"),
                        (":tpot=5", "needs a name"), ("x:tpot=-5", "positive"), ("x:tpot=5,tpot=6", "expected")):
        with pytest.raises(ValueError, match="--sla-class"):
            SLAClass.parse(text)
        assert match
    with pytest.raises(ValueError, match="defined twice"):
        SchedulerConfig(sla_classes=(BATCH, BATCH))
    with pytest.raises(ValueError, match="--default-sla-class 'gold'"):
        SchedulerConfig(sla_classes=(BATCH,), default_sla_class="gold")
    with pytest.raises(ValueError, match="--scheduling-policy"):
        SchedulerConfig(scheduling_policy="lifo")


def test_offline_generate_takes_priorities_and_classes(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=64, max_num_seqs=1, batch_controller="static",
              scheduling_policy="priority", sla_classes=["interactive:tpot=60,ttft=2000", "batch"])
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = ["one", "two", "three"]
    outs = llm.generate(prompts, params, priority=[2, 0, 1], sla_class=["batch", None, "interactive"])
    assert [o.prompt for o in outs] == prompts
    # one sequence at a time, admitted in priority order: each waited for those before it
    waited = {o.prompt: o.queue_time_s for o in outs}
    assert waited["two"] < waited["three"] < waited["one"]
    with pytest.raises(RequestRejectedError, match="unknown SLA class"):
        llm.generate(prompts, params, sla_class="gold")
    with pytest.raises(ValueError, match="priority: need one per prompt"):
        llm.generate(prompts, params, priority=[1])
    assert not llm.engine.has_unfinished_requests()
