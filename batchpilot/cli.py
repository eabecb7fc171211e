"""`batchpilot serve | generate | bench | simulate | profile | plot-trace` command line."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys

from batchpilot.config import (
    CONTROLLERS,
    DEFAULT_MODEL_NAME,
    DTYPES,
    QUANTIZATIONS,
    SCHEDULING_POLICIES,
    CacheConfig,
    ControllerConfig,
    EngineConfig,
    SchedulerConfig,
    SLAClass,
)
from batchpilot.model.args import ModelLoadError
from batchpilot.sampling_params import SamplingParams


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds an engine."""
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--quantization", "-q", default=None, choices=QUANTIZATIONS,
                   help="weight-only quantization of the layers' weights (lm_head: int8) (default: none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV pool size (default: from free memory)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompt prefixes seen before (default: on)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    add_controller_args(p)
    add_request_class_args(p)


def add_request_class_args(p: argparse.ArgumentParser) -> None:
    """Per-request priorities and SLA classes."""
    g = p.add_argument_group("priorities and SLA classes")
    g.add_argument("--scheduling-policy", default="fcfs", choices=SCHEDULING_POLICIES,
                   help="fcfs, or priority: requests' `priority` field, lower first (vLLM's flag)")
    g.add_argument("--priority-aging-s", type=float, default=60.0,
                   help="seconds of waiting one priority level (or having no TTFT target) is worth: bounds starvation")
    g.add_argument("--sla-class", action="append", default=[], metavar="NAME:tpot=MS,ttft=MS",
                   help="a latency class requests may name (body field sla_class or header x-batchpilot-sla); "
                        "repeat for several; tpot and ttft are optional")
    g.add_argument("--default-sla-class", default=None, metavar="NAME",
                   help="the class of requests that name none (default: none; --sla-tpot-ms holds for them)")


def add_controller_args(p: argparse.ArgumentParser) -> None:
    """The batch-controller flags (the engine's, the simulator's)."""
    c = p.add_argument_group("batch controller")
    c.add_argument("--batch-controller", default="combined", help=f"one of {', '.join(CONTROLLERS)}")
    c.add_argument("--max-num-seqs", type=int, default=256, help="B_max (the fixed limit of 'static')")
    c.add_argument("--min-num-seqs", type=int, default=1, help="B_min")
    c.add_argument("--memory-mode", default="cost",
                   help="cost (the default, it won the tournament: each request's own lifetime, admitting past a "
                        "predicted overflow only when the measured batch gain pays the recompute), blocks (the "
                        "authors' heuristic), clt (the paper's bound) or peak (cost without the cost rule)")
    c.add_argument("--memory-factor", type=float, default=0.95)
    c.add_argument("--mem-epsilon", type=float, default=0.05, help="overflow probability eps_M")
    c.add_argument("--sla-tpot-ms", type=float, default=None, help="decode latency target D_SLA")
    c.add_argument("--sla-tolerance-ms", type=float, default=None, help="band eps_D (default 10%% of D_SLA)")
    c.add_argument("--sla-alpha", type=int, default=4)
    c.add_argument("--sla-delta", type=int, default=2)
    c.add_argument("--sla-window", type=int, default=16,
                   help="steps averaged for the latency signal, at least (it follows the mean output length of "
                        "recent requests, up to 256)")
    c.add_argument("--sla-signal", default="tpot", choices=["tpot", "decode"],
                   help="tpot: all decoding steps, token-weighted; decode: decode-only steps (the paper's D(b))")
    c.add_argument("--sla-percentile", type=float, default=90.0,
                   help="percentile of requests' TPOT held inside --sla-tpot-ms (0: the mean, as the paper)")
    c.add_argument("--sla-ttft-ms", type=float, default=None,
                   help="TTFT target: while the request next in line has waited 80%% of it, the TPOT loop "
                        "stops holding admissions back (memory still bounds the batch); a request whose "
                        "--sla-class sets a ttft is judged by that one")
    c.add_argument("--controller-trace", default=None, metavar="PATH", help="JSONL trace, one line per step")
    c.add_argument("--sglang-init-ratio", type=float, default=0.7, help="sglang: starting new_token_ratio")
    c.add_argument("--sglang-min-ratio-factor", type=float, default=0.14, help="sglang: floor as a share of it")
    c.add_argument("--sglang-decay-steps", type=int, default=600, help="sglang: steps from start to floor")
    c.add_argument("--sglang-clip-max-new-tokens", type=int, default=4096, help="sglang: max_new_tokens clip")


def controller_config(args: argparse.Namespace) -> ControllerConfig:
    """ControllerConfig from the flags; raises ValueError naming the bad flag."""
    return ControllerConfig(
        name=args.batch_controller, max_num_seqs=args.max_num_seqs, min_num_seqs=args.min_num_seqs,
        memory_mode=args.memory_mode, memory_factor=args.memory_factor, mem_epsilon=args.mem_epsilon,
        sla_tpot_ms=args.sla_tpot_ms, sla_tolerance_ms=args.sla_tolerance_ms, sla_alpha=args.sla_alpha,
        sla_delta=args.sla_delta, sla_window=args.sla_window, sla_signal=args.sla_signal,
        sla_percentile=args.sla_percentile, sla_ttft_ms=args.sla_ttft_ms,
        trace_path=args.controller_trace, sglang_init_ratio=args.sglang_init_ratio,
        sglang_min_ratio_factor=args.sglang_min_ratio_factor, sglang_decay_steps=args.sglang_decay_steps,
        sglang_clip_max_new_tokens=args.sglang_clip_max_new_tokens,
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the flags; raises ValueError naming the bad flag."""
    return EngineConfig(
        model=args.model, dtype=args.dtype, quantization=args.quantization, threads=args.threads, seed=args.seed,
        cache=CacheConfig(block_size=args.block_size, kv_cache_gib=args.kv_cache_gib,
                          enable_prefix_caching=args.enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len, scheduling_policy=args.scheduling_policy,
                                  priority_aging_s=args.priority_aging_s,
                                  sla_classes=tuple(SLAClass.parse(c) for c in args.sla_class),
                                  default_sla_class=args.default_sla_class),
        controller=controller_config(args),
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from batchpilot.llm import LLM

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.sampling_seed, stop=args.stop or None,
    )
    llm = LLM.from_config(engine_config(args))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for prompt, out in zip(args.prompts, outputs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.outputs[0].text)
    return 0


def server_config(args: argparse.Namespace):
    """ServerConfig from the `serve` flags (model names, key, queue)."""
    from batchpilot.model.loader import resolve_model_path
    from batchpilot.server.app import ServerConfig

    if args.served_model_name:
        names = [args.served_model_name]
    elif args.model is None:
        names = [DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"]
    else:
        names = [args.model]
    return ServerConfig(model_names=names, model_root=str(resolve_model_path(args.model)),
                        api_key=args.api_key or os.environ.get("BATCHPILOT_API_KEY"),
                        protect_metrics=args.protect_metrics, max_queue=args.max_queue,
                        max_request_body_mb=args.max_request_body_mb,
                        metrics_names=args.metrics_names, sla_tpot_ms=args.sla_tpot_ms)


def ray_app_from_env(args: dict[str, str] | None = None):
    """Ray Serve config-file entry (`import_path: batchpilot.cli:ray_app_from_env`): the
    `batchpilot serve` flags in BATCHPILOT_SERVE_ARGS, parsed here and handed over as configs."""
    from batchpilot.deploy import ray as ray_deploy

    ns = build_parser().parse_args(["serve", *shlex.split(os.environ.get("BATCHPILOT_SERVE_ARGS", ""))])
    return ray_deploy.deployment(engine_config(ns), server_config(ns), ns.replicas, ns.threads or 1)


def cmd_serve(args: argparse.Namespace) -> int:
    config = server_config(args)
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be non-negative, got {args.shutdown_timeout}")
    if args.replicas != 1:
        if args.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
        try:
            from batchpilot.deploy import ray as ray_deploy  # Ray only when asked for
        except ImportError as e:
            raise ValueError(f"--replicas needs Ray Serve: pip install 'ray[serve]' ({e})") from e

        ray_deploy.run(engine_config(args), config, args.replicas, args.threads or 1, args.host, args.port)
        return 0
    import uvicorn

    from batchpilot.engine.async_engine import AsyncEngine
    from batchpilot.llm import build_engine
    from batchpilot.server.app import build_app

    engine = build_engine(engine_config(args))
    dead: list[BaseException] = []

    def exit_for_supervisor(error: BaseException) -> None:
        dead.append(error)  # /health answers 503 meanwhile; the process then exits non-zero
        uvicorn_server.should_exit = True

    async_engine = AsyncEngine(engine, on_dead=exit_for_supervisor)
    app = build_app(async_engine, config)
    logging.getLogger("batchpilot").info("serving %s on http://%s:%d", config.model_names[0], args.host, args.port)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was there
    # before it; a no-op one makes a graceful shutdown end with exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                                                   log_level=args.log_level.lower(),
                                                   timeout_graceful_shutdown=args.shutdown_timeout))
    uvicorn_server.run()
    if dead:
        logging.getLogger("batchpilot").error("the engine died (%s); exiting with status 1", dead[0])
        return 1
    return 0


def cmd_plot_trace(args: argparse.Namespace) -> int:
    from batchpilot.bench.plots import plot_trace

    plot_trace(args.trace, args.out)
    print(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchpilot", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts offline and print the results")
    add_engine_args(gen)
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="model id clients use (default: the model)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or BATCHPILOT_API_KEY)")
    serve.add_argument("--protect-metrics", action="store_true", help="require the API key for /metrics too")
    serve.add_argument("--metrics-names", default="batchpilot", choices=["batchpilot", "vllm", "both"],
                       help="prefix of the standard series on /metrics (vllm: a vLLM dashboard reads them "
                            "unchanged); the controller's own series are batchpilot: always")
    serve.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 503 + Retry-After")
    serve.add_argument("--max-request-body-mb", type=float, default=16.0,
                       help="larger request bodies get a 413 before they are read")
    serve.add_argument("--replicas", type=int, default=1,
                       help="engine replicas behind one endpoint, on Ray Serve, routed by load (--threads each)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests before aborting them")
    serve.set_defaults(func=cmd_serve)

    from batchpilot.bench.throughput import add_throughput_parser

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    add_throughput_parser(bench, add_engine_args, engine_config)
    from batchpilot.bench.commands import add_bench_commands, add_client_args
    from batchpilot.bench.compare import add_compare_parser

    add_bench_commands(bench)
    add_compare_parser(bench, add_client_args)

    from batchpilot.sim.commands import add_profile_parser, add_simulate_parser

    add_simulate_parser(sub, add_controller_args, controller_config)
    add_profile_parser(sub)

    plot = sub.add_parser("plot-trace", help="draw a controller trace (JSONL) over time")
    plot.add_argument("trace", metavar="TRACE")
    plot.add_argument("--out", required=True, metavar="PNG")
    plot.set_defaults(func=cmd_plot_trace)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns a benchmark's output
    try:
        return args.func(args)
    except ModelLoadError as e:
        print(f"batchpilot: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # configuration and request validation errors name their flag
        print(f"batchpilot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable or unwritable paths given on the command line
        print(f"batchpilot: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
