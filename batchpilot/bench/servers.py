"""Servers under benchmark: a free port, start and wait for /health, stop; the replicas of a
`serve --replicas` endpoint all up (used by bench compare, the benchmarks and the tests)."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

_PORTS_GIVEN: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now, outside the kernel's ephemeral range and not given out before by this
    process. A port from bind(0) is ephemeral: released, it can be handed to the next bind(0)
    (vLLM's engine takes its internal ports that way), so a server started on it a moment later
    can find it taken."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(20000, 32768) if not low <= p <= high] or list(range(high + 1, 65536))
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(candidates)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError("no free port found outside the ephemeral range")


def wait_for_replicas(url: str, replicas: int, timeout: float) -> None:
    """A `serve --replicas` endpoint answers /health once one replica is up; wait until every
    replica reports on /metrics (each publishes its batch limit there) and the proxy routes to
    each of them (it learns of a new replica a moment after the replica reports: a burst sent
    in between lands on the replicas it already knew)."""
    from batchpilot.deploy.routing import REPLICA_HEADER

    deadline = time.monotonic() + timeout
    answered: set[str] = set()
    while (httpx.get(f"{url}/metrics", timeout=30).text.count("batchpilot:batch_limit{") < replicas
           or len(answered) < replicas):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{replicas} replicas not up after {timeout:.0f}s (routed to {len(answered)})")
        answered.add(httpx.get(f"{url}/health", timeout=30).headers.get(REPLICA_HEADER, ""))
        answered.discard("")
        time.sleep(0.2)


@contextmanager
def server(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None):
    """Start a server on a free port, wait for /health, yield (base URL, process); SIGTERM
    (then SIGKILL) it afterwards."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}; see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {timeout:.0f}s; see {log}")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
