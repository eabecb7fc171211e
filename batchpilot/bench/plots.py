"""Plots (matplotlib, PNG): controller timelines, latency CDFs, capacity curves."""

from __future__ import annotations

import json
from pathlib import Path

from batchpilot.bench.metrics import tpot_ms_per_request


def read_trace(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line: {e}") from e
    if not rows:
        raise ValueError(f"{path}: empty trace")
    return rows


def plot_trace(path: str | Path, out: str | Path) -> None:
    """Limits and batch, queue, KV usage and step time over time: what the controller did."""
    plt = _pyplot()
    rows = read_trace(path)
    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    ax = axes[0]
    for key, style in (("b_t", "-"), ("b_mem", "--"), ("b_sla", ":")):
        if key in rows[0]:
            ax.step(t, [r[key] for r in rows], style, where="post", label=key)
    ax.step(t, [r["batch_size"] for r in rows], "-", where="post", alpha=0.6, label="batch size")
    ax.set_ylabel("sequences")
    ax.set_title(f"controller trace: {Path(path).name}")
    ax.legend(loc="upper right")
    axes[1].plot(t, [r["num_running"] for r in rows], label="running")
    axes[1].plot(t, [r["num_waiting"] for r in rows], label="waiting")
    axes[1].set_ylabel("requests")
    axes[1].legend(loc="upper right")
    axes[2].plot(t, [100 * r["kv_usage"] for r in rows], label="KV usage %")
    pre_t = [r["t"] for r in rows if r["num_preemptions"]]
    axes[2].scatter(pre_t, [100] * len(pre_t), marker="x", color="red", label="preemption")
    axes[2].set_ylabel("KV %")
    axes[2].set_ylim(0, 105)
    axes[2].legend(loc="lower right")
    decode_only = [r for r in rows if r["num_decode_tokens"] and not r["num_prefill_tokens"]]
    axes[3].plot([r["t"] for r in decode_only], [1000 * r["step_time_s"] for r in decode_only], ".",
                 markersize=2, label="decode-only step ms")
    axes[3].set_ylabel("ms")
    axes[3].set_xlabel("seconds")
    axes[3].legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(results: dict[str, dict], out: str | Path) -> None:
    """Latency CDFs (TTFT, TPOT, E2E) per configuration."""
    plt = _pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms"), ("TTFT", "TPOT", "E2E latency")):
        for name, r in results.items():
            values = np.sort(np.asarray(_per_request_ms(r, key), dtype=float))
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name)
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _per_request_ms(result: dict, key: str) -> list[float]:
    """One latency per successful request (ms) from a bench serve result's per-request lists."""
    if "ttfts" not in result:
        return []
    if key == "tpot_ms":
        return tpot_ms_per_request(result)
    seconds = result["ttfts"] if key == "ttft_ms" else result["e2els"]
    return [s * 1000 for s, err in zip(seconds, result["errors"]) if not err]


def plot_capacity(results: dict[str, dict], out: str | Path) -> None:
    """SLA attainment versus request rate for each configuration's capacity search."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _attainment_curves(ax, results)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_sweep(results: dict[str, dict], out: str | Path) -> None:
    """`simulate sweep`: offline throughput per configuration, and SLA attainment over rate when searched."""
    plt = _pyplot()
    searched = any(r.get("capacity_curve") for r in results.values())
    fig, axes = plt.subplots(1, 2 if searched else 1, figsize=(14 if searched else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    names = list(results)
    ax.bar(names, [results[n]["output_throughput"] for n in names])
    ax.set_ylabel("output tokens/s (all requests at t=0)")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(alpha=0.3, axis="y")
    if searched:
        _attainment_curves(axes[0][1], results)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _attainment_curves(ax, results: dict[str, dict]) -> None:
    """Each configuration's capacity search: SLA attainment at the rates it probed."""
    for name, r in results.items():
        curve = sorted((p["rate"], p["sla_attainment"]) for p in r.get("capacity_curve", []))
        if curve:
            ax.plot(*zip(*curve), "o-", label=f"{name} (capacity {r.get('capacity', 0):.2f})")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLA attainment")
    ax.grid(alpha=0.3)
    ax.legend()
