"""batchpilot on Ray Serve: N engine replicas behind one OpenAI-compatible endpoint.

Each replica is the single-process server (engine, its own controller, the same FastAPI app,
so routes, streaming and errors are the same). Ray Serve's proxy sends each HTTP request to
a replica chosen by `LoadAwareRequestRouter`, which ranks replicas by the load they report
every half second (`record_routing_stats`) with the policy of batchpilot.deploy.routing.
Each response names its replica in an `x-batchpilot-replica` header. `/metrics` serves every
replica's metrics with a `replica` label: replicas publish theirs to a small named actor.
Ray Serve replaces a replica that dies; requests that were on it fail, the others go on.

From a Ray Serve config file: `import_path: batchpilot.cli:ray_app_from_env` with the
`batchpilot serve` flags in BATCHPILOT_SERVE_ARGS (and, for OpenAI-shaped errors from a dead
replica, RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=batchpilot.deploy.proxy:proxy_middlewares in
the environment Ray starts with); or `batchpilot serve --replicas N`, which does both.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import asdict, replace
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from batchpilot.config import EngineConfig
from batchpilot.deploy.metrics import merge_metrics
from batchpilot.deploy.proxy import proxy_middlewares
from batchpilot.deploy.routing import REPLICA_HEADER, ReplicaLoad, replica_load, two_choices
from batchpilot.server.app import ServerConfig

METRICS_ACTOR = "batchpilot-metrics"
STATS_PERIOD_S = 0.5
_STALE_S = 10.0  # a replica silent this long (dead, or replaced) leaves /metrics
_replica: dict[str, Any] = {}  # this replica process's engine and B_max, set when its app is built


class LoadAwareRequestRouter(RequestRouter):
    """Power of two choices over the replicas' reported load (batchpilot.deploy.routing).

    Reports are periodic, so requests routed to a replica lately count as waiting there;
    without this a burst arriving between two reports lands on one replica. A request counts
    from the moment it is chosen, not from `on_request_routed`: Serve runs several routing
    tasks at once, so a burst's requests are all chosen before the first is acknowledged.
    """

    def initialize_state(self, **kwargs) -> None:
        self._sent: dict[str, list[float]] = {}  # replica id -> times of requests routed to it lately
        self._rng = random.Random()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ranked = two_choices(candidate_replicas, self._rng, lambda r: self._load(r).rank())
        if ranked:
            self._sent.setdefault(ranked[0].replica_id.unique_id, []).append(time.monotonic())
        return [[r] for r in ranked]

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        # NOTE: requests routed within the last two report periods may be missing from the report
        # (Serve hands out a fresh copy of it, so "since the last report" cannot be told apart).
        horizon = time.monotonic() - 2 * STATS_PERIOD_S
        recent = [t for t in self._sent.get(replica.replica_id.unique_id, []) if t > horizon]
        self._sent[replica.replica_id.unique_id] = recent
        load = _load(replica.routing_stats)
        return replace(load, num_waiting=load.num_waiting + len(recent))


def _load(stats: dict[str, Any] | None) -> ReplicaLoad:
    """A replica's last report (`routing_stats`); one that has not reported yet counts as idle."""
    return ReplicaLoad(**stats) if stats else ReplicaLoad.idle()


@ray.remote(num_cpus=0)
class MetricsHub:
    """Latest Prometheus text of every replica, for any replica's /metrics to merge."""

    def __init__(self):
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.time(), text)

    def get(self) -> dict[str, str]:
        now = time.time()
        return {name: text for name, (t, text) in self.texts.items() if now - t < _STALE_S}


def _build_replica_app(engine_config: EngineConfig, server_config: ServerConfig):
    """Runs in each replica process: the engine and the single-process app, plus the Ray parts."""
    from fastapi import Request

    from batchpilot.engine.async_engine import AsyncEngine
    from batchpilot.llm import build_engine
    from batchpilot.server.app import build_app

    name = serve.get_replica_context().replica_id.unique_id
    engine = AsyncEngine(build_engine(engine_config))
    _replica.update(engine=engine, max_num_seqs=engine_config.controller.max_num_seqs)
    hub = MetricsHub.options(name=METRICS_ACTOR, get_if_exists=True, lifetime="detached").remote()

    async def merged_metrics() -> str:
        return merge_metrics(await hub.get.remote())

    app = build_app(engine, server_config, metrics_text=merged_metrics)

    @app.middleware("http")
    async def name_the_replica(request: Request, call_next):
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = name
        return response

    def publish() -> None:
        from prometheus_client import generate_latest

        registry = app.state.metrics.registry
        while True:
            try:
                hub.put.remote(name, generate_latest(registry).decode())
            except Exception:  # noqa: BLE001 - the hub restarting must not kill the replica
                pass
            time.sleep(1.0)

    threading.Thread(target=publish, name="batchpilot-metrics", daemon=True).start()
    return app


def routing_stats() -> dict[str, Any]:
    """This replica's load for the router; empty (counted idle) while its engine is being built.

    NOTE: module-level so that it reads this module's `_replica`: methods of the deployment class
    (defined in `deployment`) are pickled by value, with a copy of the globals they name.
    """
    if "engine" not in _replica:
        return {}
    return asdict(replica_load(_replica["engine"].engine.snapshot(), _replica["max_num_seqs"]))


def deployment(engine_config: EngineConfig, server_config: ServerConfig, replicas: int, threads: int):
    """The Ray Serve application: `replicas` engines of `threads` CPUs each, routed by load."""
    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")

    def build_app():  # a plain function: Serve calls functions (not partials) once per replica
        return _build_replica_app(engine_config, server_config)

    @serve.deployment(
        name="batchpilot",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=server_config.max_queue + 256,  # our own queue answers 503 first
        request_router_config=RequestRouterConfig(request_router_class=LoadAwareRequestRouter,
                                                  request_routing_stats_period_s=STATS_PERIOD_S,
                                                  request_routing_stats_timeout_s=STATS_PERIOD_S * 4),
    )
    @serve.ingress(build_app)
    class BatchpilotReplica:
        def record_routing_stats(self) -> dict[str, Any]:
            return routing_stats()

    return BatchpilotReplica.bind()


def run(engine_config: EngineConfig, server_config: ServerConfig, replicas: int, threads: int, host: str,
        port: int) -> None:
    """`batchpilot serve --replicas N`: start Ray and Serve here, deploy, serve until a signal."""
    import signal

    # NOTE: read by the proxy process at import; Ray's processes inherit this process's environment.
    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = f"{proxy_middlewares.__module__}:proxy_middlewares"
    ray.init(num_cpus=max(os.cpu_count() or 1, replicas * threads), include_dashboard=False, namespace="batchpilot")
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(engine_config, server_config, replicas, threads), name="batchpilot", route_prefix="/")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
