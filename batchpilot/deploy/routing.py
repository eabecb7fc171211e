"""Which replica gets the next request: load-aware (power of two choices) or round-robin.

Each replica reports its load: waiting and running requests, KV usage and the batch limit its
controller set. The router prefers, in order: a replica that would admit the request at once
(`running + waiting < limit`: its controller, which watches its memory and latency, has room),
then the one with fewer requests in it, then the one with less KV in use. Power of two choices
compares two replicas drawn at random rather than all, which keeps most of the benefit while
routers working from the same stale reports do not all stampede onto one replica. Reports
are periodic, so the router counts the requests it sent since a replica's last report as
waiting there.

NOTE: the limit is not used as a free-slot count (`limit - running`): an idle replica's SLA
limit is stale (nothing ran to move it), and ranking by it starved such replicas in the
simulator (one of four served 3 of 600 requests).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from batchpilot.engine.engine import EngineSnapshot

T = TypeVar("T")
REPLICA_HEADER = "x-batchpilot-replica"  # names the replica that answered, on every response
UNKNOWN_LIMIT = 2**31 - 1  # the batch limit assumed of a replica that has not reported


@dataclass(frozen=True)
class ReplicaLoad:
    num_waiting: int
    num_running: int
    kv_usage: float  # in [0, 1]
    batch_limit: int

    @classmethod
    def idle(cls) -> ReplicaLoad:
        """What is assumed of a replica that has not reported yet: empty, its limit unknown.

        NOTE: the unknown limit must not look small: a router learns of a new replica before its
        first report, and a small limit would rank the empty replica as full (docs/design_notes.md).
        """
        return cls(0, 0, 0.0, UNKNOWN_LIMIT)

    def rank(self) -> tuple[int, int, float]:
        """Smaller is better: (would queue, requests in the replica, KV usage)."""
        requests = self.num_running + self.num_waiting
        return (requests >= self.batch_limit, requests, self.kv_usage)


def two_choices(candidates: Sequence[T], rng: random.Random, rank: Callable[[T], Any]) -> list[T]:
    """Power of two choices: two candidates drawn at random (one if only one), best rank first.

    Shared by the simulator's router and the Ray Serve request router.
    """
    pair = rng.sample(list(candidates), 2) if len(candidates) > 1 else list(candidates)
    return sorted(pair, key=rank)


def replica_load(snapshot: EngineSnapshot, max_num_seqs: int) -> ReplicaLoad:
    """A replica's load from its engine; before its first step the limit is B_max (no information yet)."""
    return ReplicaLoad(snapshot.num_waiting, snapshot.num_running, snapshot.kv_usage,
                       snapshot.batch_limit or max_num_seqs)


class Router:
    """Base: keeps the latest report of every replica plus what was sent since."""

    def __init__(self, num_replicas: int):
        if num_replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {num_replicas}")
        self.loads = [ReplicaLoad.idle()] * num_replicas

    def report(self, replica: int, load: ReplicaLoad) -> None:
        """A replica's fresh load (replaces what the router assumed since its last report)."""
        self.loads[replica] = load

    def choose(self, alive: Sequence[int] | None = None) -> int:
        """The replica for the next request (among `alive`, default all); counts it as waiting there."""
        candidates = list(range(len(self.loads))) if alive is None else list(alive)
        if not candidates:
            raise RuntimeError("no replica is available")
        i = self._pick(candidates)
        load = self.loads[i]
        self.loads[i] = replace(load, num_waiting=load.num_waiting + 1)
        return i

    def _pick(self, candidates: list[int]) -> int:
        raise NotImplementedError


class LoadAwareRouter(Router):
    """Power of two choices over `ReplicaLoad.rank`."""

    def __init__(self, num_replicas: int, seed: int = 0):
        super().__init__(num_replicas)
        self._rng = random.Random(seed)

    def _pick(self, candidates: list[int]) -> int:
        return two_choices(candidates, self._rng, lambda i: self.loads[i].rank())[0]


class RoundRobinRouter(Router):
    """The baseline: each replica in turn, whatever its load."""

    def __init__(self, num_replicas: int, seed: int = 0):
        super().__init__(num_replicas)
        self._next = 0

    def _pick(self, candidates: list[int]) -> int:
        i = candidates[self._next % len(candidates)]
        self._next += 1
        return i


ROUTERS = {"load-aware": LoadAwareRouter, "round-robin": RoundRobinRouter}


def make_router(name: str, num_replicas: int, seed: int = 0) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"--routing must be one of {', '.join(ROUTERS)}, got {name!r}")
    return ROUTERS[name](num_replicas, seed)
