"""Shared pieces of the fault tests: metrics scraping, kill -9 of a process group, listening sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from helpers.worker_harness import WorkerRun

WORLD_A = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_a.yaml"
START_TS_MS = 1_767_225_600_000
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(port: int, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Prometheus text of ``127.0.0.1:port/metrics`` as {'name{labels}': value}; {} when it does not answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    try:
        text = _HTTP.open(request, timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.split("\n"):  # not splitlines(): label values may hold U+2028 and friends
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of ``name`` over the series whose labels include ``labels``."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def worker_metrics_port(run: WorkerRun) -> int:
    return run.settings.streams.metrics_port


def kill_worker(run: WorkerRun) -> int:
    """kill -9 every worker process group of ``run``; forget them (so a restart is not taken for a crash)."""
    killed = 0
    for proc in run.procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait(timeout=30)
    run.procs.clear()
    return killed


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


def listening_addresses(pid: int) -> set[str]:
    """IP addresses the process ``pid`` and its children listen on (TCP)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found: set[str] = set()
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    # gRPC binds an IPv6 socket to the IPv4-mapped loopback: still loopback only.
    return {"127.0.0.1" if ip == "::ffff:127.0.0.1" else ip for ip in found}


def proc_of(run: WorkerRun) -> subprocess.Popen:
    assert run.procs, "no worker running"
    return run.procs[-1]
