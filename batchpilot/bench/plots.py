"""Plots (matplotlib, PNG): the controller timeline from a JSONL trace."""

from __future__ import annotations

import json
from pathlib import Path


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
