"""Start a real `batchpilot serve` process on a free local port for end-to-end tests."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import httpx

from batchpilot.bench.servers import free_port, server

__all__ = ["free_port", "metric", "running_server"]


@contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, startup_timeout: float = 180,
                   log: Path | None = None):
    """Yields (base_url, process) of a float32 server on the default model; stops it on exit.
    `log`: where its output goes (default: a temporary file)."""
    cmd = [sys.executable, "-m", "batchpilot.cli", "--log-level", "WARNING", "serve", "--dtype", "float32",
           "--threads", "2", "--kv-cache-gib", "0.2", *args]
    with tempfile.TemporaryDirectory() as tmp:
        with server(cmd, log or Path(tmp) / "server.log", startup_timeout,
                    env={**os.environ, **(env or {})}) as running:
            yield running


def metric(url: str, name: str) -> float:
    """Sum of a metric's samples on /metrics (for unlabelled use, the single value)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    if not values:
        raise KeyError(name)
    return sum(values)
