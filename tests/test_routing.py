"""Routing between replicas: the policy against replica states, and fleets in the simulator."""

import pytest

from batchpilot.bench.datasets import LengthDist
from batchpilot.bench.metrics import summarize
from batchpilot.config import ControllerConfig, SchedulerConfig
from batchpilot.deploy.routing import LoadAwareRouter, ReplicaLoad, RoundRobinRouter, make_router
from batchpilot.sim.driver import make_workload, simulate
from batchpilot.sim.roofline import Hardware, ModelShape, RooflineModel


def test_load_aware_avoids_a_replica_with_a_queue():
    router = LoadAwareRouter(2)
    router.report(0, ReplicaLoad(num_waiting=5, num_running=20, kv_usage=0.3, batch_limit=20))
    router.report(1, ReplicaLoad(num_waiting=0, num_running=10, kv_usage=0.5, batch_limit=16))
    assert router.choose() == 1


def test_a_replica_at_its_limit_loses_to_a_busier_one_with_room():
    # replica 0's memory controller cut its limit to the 12 it runs: the request would wait there
    router = LoadAwareRouter(2)
    router.report(0, ReplicaLoad(0, 12, 0.95, 12))
    router.report(1, ReplicaLoad(0, 14, 0.40, 64))
    assert router.choose() == 1
    # with room on both, the less loaded one wins, whatever its limit (an idle replica's is stale)
    router.report(0, ReplicaLoad(0, 0, 0.0, 1))
    router.report(1, ReplicaLoad(0, 14, 0.40, 64))
    assert router.choose() == 0


def test_ties_go_to_lower_kv_usage_and_sent_requests_count_until_the_next_report():
    router = LoadAwareRouter(2)
    router.report(0, ReplicaLoad(0, 4, 0.7, 8))
    router.report(1, ReplicaLoad(0, 4, 0.2, 8))
    picks = [router.choose() for _ in range(8)]
    # 1 first (tie, lower KV); then each pick lowers the chosen one's headroom, so they alternate
    assert picks[0] == 1 and picks.count(0) == picks.count(1) == 4
    assert router.loads[0].num_waiting == router.loads[1].num_waiting == 4
    router.report(1, ReplicaLoad(0, 0, 0.0, 8))  # a fresh report replaces the assumption
    assert router.choose() == 1


def test_a_replica_that_has_not_reported_competes_on_the_requests_sent_to_it():
    # a new replica is routable before its first report: its unknown limit must not count as full
    router = LoadAwareRouter(2)
    router.report(0, ReplicaLoad(0, 0, 0.0, 256))
    picks = [router.choose() for _ in range(16)]
    assert picks.count(0) == picks.count(1) == 8


def test_power_of_two_choices_never_picks_the_worst_of_many():
    router = LoadAwareRouter(8, seed=3)
    picks = []
    for _ in range(200):
        for k in range(8):
            router.report(k, ReplicaLoad(0, 50 if k == 7 else k, 0.0, 100))  # replica 7 is the busiest
        picks.append(router.choose())
    assert 7 not in picks and len(set(picks)) > 3  # spread, not herded onto one


def test_round_robin_ignores_load_and_dead_replicas_are_skipped():
    router = RoundRobinRouter(3)
    router.report(0, ReplicaLoad(100, 100, 1.0, 1))
    assert [router.choose() for _ in range(4)] == [0, 1, 2, 0]
    assert LoadAwareRouter(3).choose(alive=[2]) == 2
    with pytest.raises(RuntimeError, match="no replica"):
        LoadAwareRouter(3).choose(alive=[])
    with pytest.raises(ValueError, match="--routing"):
        make_router("random", 2)
    with pytest.raises(ValueError, match="--replicas"):
        make_router("load-aware", 0)


def fleet(routing, replicas=4, n=1200, rate=20.0):
    lengths = LengthDist.parse("lognormal:200:1.0", "x"), LengthDist.parse("lognormal:150:1.2", "y")
    work = make_workload(n, rate, *lengths, seed=5, max_prompt=1024, max_total=2048)
    cost = RooflineModel(ModelShape.preset("Llama-2-7B"), Hardware.preset("A100-80GB"))
    return simulate(work, cost.step_time, 15_000, ControllerConfig(name="combined", sla_tpot_ms=40),
                    SchedulerConfig(max_num_batched_tokens=2048), replicas=replicas, routing=routing, seed=1)


def test_simulated_fleet_serves_everything_on_every_replica_deterministically():
    a, b = fleet("load-aware"), fleet("load-aware")
    assert a.records == b.records and a.requests_per_replica == b.requests_per_replica
    assert len(a.records) == 1200 and sum(a.requests_per_replica) == 1200
    assert all(n > 200 for n in a.requests_per_replica)  # none starved
    rr = fleet("round-robin")
    assert rr.requests_per_replica == [300] * 4


def test_load_aware_routing_cuts_queueing_against_round_robin():
    # near saturation with heavy-tailed outputs, round-robin queues requests on a replica that is
    # at its limit while another has room (measured: P90 TTFT 7.9 s round-robin, 6.1 s load-aware)
    la = summarize(fleet("load-aware").records, 1.0)
    rr = summarize(fleet("round-robin").records, 1.0)
    assert la["p90_ttft_ms"] < 0.9 * rr["p90_ttft_ms"]
    assert la["mean_ttft_ms"] < rr["mean_ttft_ms"]
