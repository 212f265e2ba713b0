"""Serving on Triton: creative_for latency at concurrency 1 and 8, Triton overhead, perf_analyzer, publish->live, rollback.

One run with the real tritonserver (``.venv-triton``) and a real published model
(``--quick``: the tiny QUICK_MODEL; full: the default architecture), both built
from config:

(a) ``CreativeClient.creative_for`` by user id (users resolved through the Feast
    online store, SQLite) at concurrency 1 and 8 after the slates were
    pre-generated: p50/p99 in ms and requests/s; ``errors`` counts exceptions
    and fallbacks for known users (must be 0);
(b) the same generation (K prompts, same seed) through Triton's ``gmllm`` and
    called in-process on the same published version: ``overhead_ratio`` =
    median Triton / median in-process;
(c) ``perf_analyzer`` (tritonclient 2.51.0 in .venv-triton) against
    ``creative``: its own throughput and p99 (None with the reason when it
    cannot run, e.g. Debian's libb64-0d missing);
(d) ``publish_to_live_s``: announcement of version 2 -> live after its smoke
    test; ``rollback_s``: ``rollback`` back to version 1.

Goals: ``p99_ms_c8`` <= 10 with ``errors`` = 0; ``overhead_ratio`` <= 1.3; ``rollback_s`` <= 10.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import QUICK_MODEL, BenchOptions, print_table

GROUPS = ("mugs/g0", "mugs/g1")
PRODUCTS = ("mug-0", "mug-1", "mug-2")
GROUP_TEXT = "group mugs/g0 | 50% of mugs | ctr 4.0% | likes primary=pink"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the figures listed in the module docstring."""
    from infra.settings import load_settings
    from serving import server

    data_dir = Path(tempfile.mkdtemp(prefix="serving-", dir=options.output_dir if options.output_dir.exists()
                                     else None))
    model = QUICK_MODEL if options.quick else {}
    settings = load_settings(
        data_dir=data_dir, render={"size": 128 if options.quick else 256},
        learner={"model": model},
        features={"embed_titles": False},
        serving={"http_port": _free_port(), "grpc_port": _free_port(), "metrics_port": _free_port(),
                 "slate_size": 4, "max_new_tokens": 96},
    )
    server.find_env(settings)
    _publish(settings, seed=0)
    server.start_server(settings)
    try:
        return _run(options, settings)
    finally:
        server.stop_server(settings)


def _publish(settings: Any, seed: int) -> int:
    from learner.model.artifact import verify_artifact
    from learner.model.gmllm import GMLLM
    from learner.publish import publish_version

    artifact = settings.data_dir / f"artifact-{seed}"
    GMLLM.build(settings.learner.model, corpus=[GROUP_TEXT], seed=seed).save(artifact)
    return publish_version(artifact, settings.data_dir / "models", "gmllm", verify=verify_artifact).version


def _run(options: BenchOptions, settings: Any) -> dict[str, Any]:
    from PIL import Image

    from features.push import FeaturePusher, PushConfig
    from features.rows import user_group_row
    from features.sink import FeastSink
    from features.store import apply
    from learner.data import ProductRecord
    from serving.client import CreativeClient
    from serving.live import VersionManager

    manager = VersionManager(settings)
    manager.start()
    apply(settings)
    users = {f"u{i}": GROUPS[i % len(GROUPS)] for i in range(40)}
    pusher = FeaturePusher(FeastSink(settings), PushConfig(flush_s=0.02))
    pusher.start()
    try:
        pusher.submit("user_group", [user_group_row(u, "mugs", g) for u, g in users.items()], 1_767_225_600_000_000)
        pusher.flush(60)
    finally:
        pusher.close()
    catalog = {p: ProductRecord(p, "mugs", f"Enamel mug {i}", 9.5 + i, Image.new("RGBA", (32, 32), (200, 60 * i, 40, 255)))
               for i, p in enumerate(PRODUCTS)}
    figures: dict[str, Any] = {}
    with CreativeClient(settings, catalog, seed=0, watch=False) as client:
        started = time.perf_counter()
        client.prepare([(g, p) for g in GROUPS for p in PRODUCTS], wait=True, timeout=600)
        figures["pregenerate_s"] = round(time.perf_counter() - started, 3)
        n1 = 1000 if options.quick else 5000
        figures.update(_latency(client, users, n1, 1, "c1"))
        figures.update(_latency(client, users, n1, 8, "c8"))
        figures["errors"] = figures["errors_c1"] + figures["errors_c8"]
        figures["fallbacks_counted"] = sum(
            s.value for m in client.metrics.fallbacks.collect() for s in m.samples if s.name.endswith("_total"))
    figures.update(_overhead(settings, repeats=5 if options.quick else 20))
    figures.update(_perf_analyzer(settings, quick=options.quick))
    version = _publish(settings, seed=1)
    outcome = manager.check()
    figures["publish_to_live_s"] = None if outcome is None or outcome.result != "live" else round(
        outcome.publish_to_live_s or outcome.seconds, 3)
    figures["promoted_version"] = version if outcome and outcome.result == "live" else None
    figures["rollback_s"] = round(manager.rollback().seconds, 3)
    print_table("serving", ["figure", "value"], sorted(figures.items()))
    return figures


def _latency(client: Any, users: dict[str, str], n: int, concurrency: int, tag: str) -> dict[str, Any]:
    names = list(users)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker(offset: int) -> None:
        mine = []
        for i in range(offset, n, concurrency):
            t0 = time.perf_counter()
            try:
                shown = client.creative_for(names[i % len(names)], PRODUCTS[i % len(PRODUCTS)])
                bad = shown.fallback or not shown.png
            except Exception:  # noqa: BLE001 - counted
                bad = True
            mine.append(time.perf_counter() - t0)
            if bad:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {f"p50_ms_{tag}": round(1000 * _percentile(latencies, 0.5), 4),
            f"p99_ms_{tag}": round(1000 * _percentile(latencies, 0.99), 4),
            f"requests_per_s_{tag}": round(len(latencies) / wall, 1),
            f"errors_{tag}": errors[0]}


def _overhead(settings: Any, repeats: int) -> dict[str, Any]:
    from learner.data import ProductRecord
    from learner.model.gmllm import GMLLM
    from learner.pretrain import torch_threads
    from serving.triton_io import TritonCalls

    product = {"id": "mug-1", "category": "mugs", "title": "Enamel mug 1", "price": 10.5}
    k, seed, temperature = settings.serving.slate_size, 3, 0.9
    calls = TritonCalls(settings, protocol="grpc")
    triton = []
    try:
        calls.generate(GROUP_TEXT, product, None, k=k, seed=seed, temperature=temperature, version=1)
        for _ in range(repeats):
            t0 = time.perf_counter()
            calls.generate(GROUP_TEXT, product, None, k=k, seed=seed, temperature=temperature, version=1)
            triton.append(time.perf_counter() - t0)
    finally:
        calls.close()
    local = []
    with torch_threads(settings.learner.threads):
        model = GMLLM.load(settings.data_dir / "models" / "gmllm" / "1")
        record = ProductRecord(product["id"], product["category"], product["title"], product["price"])
        model.generate(GROUP_TEXT, record, n=k, seed=seed, temperature=temperature,
                       max_new_tokens=settings.serving.max_new_tokens)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(GROUP_TEXT, record, n=k, seed=seed, temperature=temperature,
                           max_new_tokens=settings.serving.max_new_tokens)
            local.append(time.perf_counter() - t0)
    triton_ms, local_ms = 1000 * statistics.median(triton), 1000 * statistics.median(local)
    return {"generate_ms_triton": round(triton_ms, 2), "generate_ms_in_process": round(local_ms, 2),
            "overhead_ratio": round(triton_ms / local_ms, 3)}


def _perf_analyzer(settings: Any, quick: bool) -> dict[str, Any]:
    from serving.server import find_env

    env = find_env(settings)
    binary = env.perf_analyzer
    cudart = sorted(env.site_packages.glob("nvidia/cuda_runtime/lib"))
    data = settings.data_dir / "perf_input.json"
    data.write_text(json.dumps({"data": [{
        "GROUP_TEXT": [GROUP_TEXT], "PRODUCT": [json.dumps({"id": "mug-1", "category": "mugs", "title": "Mug"})],
        "K": [settings.serving.slate_size], "SEED": [1],
    }]}))
    csv = settings.data_dir / "perf.csv"
    argv = [str(binary), "-m", "creative", "-i", "grpc", "-u", f"{settings.serving.host}:{settings.serving.grpc_port}",
            "--input-data", str(data), "--concurrency-range", "1:2", "--measurement-interval",
            "3000" if quick else "10000", "-f", str(csv)]
    env_vars = dict(os.environ)
    env_vars["LD_LIBRARY_PATH"] = os.pathsep.join([*(str(p) for p in cudart), str(env.libs),
                                                   env_vars.get("LD_LIBRARY_PATH", "")])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env_vars)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"perf_analyzer": None, "perf_analyzer_note": str(exc)}
    if done.returncode != 0 or not csv.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()
        return {"perf_analyzer": None, "perf_analyzer_note": tail[-1] if tail else f"exit {done.returncode}"}
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {"perf_analyzer": [{"concurrency": int(r["Concurrency"]), "infer_per_s": float(r["Inferences/Second"]),
                               "p99_ms": round(float(r["p99 latency"]) / 1000, 2)} for r in rows]}
