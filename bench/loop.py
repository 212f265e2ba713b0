"""The closed loop: click → new model version live, over the rounds of one run of the whole system.

One :class:`sim.closed_loop.ClosedLoop` (broker, worker, Feast, learner with
the world's simulated CTR in its gate, Triton with the watcher, the simulated
ad system pulling every creative from serving) runs in a temporary data
directory on free ports. For each promoted round, ``click_to_live_s`` is the
time from the newest evidence of its pairs (the latest impression behind
them) to its version serving. Beside it, in the same run, the learner's own
share of that time (``round_s``: the round's training and gate) gives
``ratio_round_of_click_to_live`` — how much of the delay is learning rather
than waiting for evidence, triggers and serving.

``--quick``: 3 minutes of traffic at 150 impressions/s, rounds after 40 new
pairs or 60 s. Full: 10 minutes, rounds after 100 pairs or 150 s (the demo's).
Goal: ``click_to_live_s_max`` ≤ 300 at the demo's rate.
"""

from __future__ import annotations

import os
import socket
import sys
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import BenchOptions, print_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the loop and return the click → live figures."""
    from infra.settings import load_settings
    from sim.closed_loop import ClosedLoop, click_to_live, round_log
    from sim.simulate import DEFAULT_WORLD
    from sim.world import World

    minutes, rate = (3.0, 150.0) if options.quick else (10.0, 150.0)
    min_pairs, max_wait = (40, 60.0) if options.quick else (100, 150.0)
    world_file = options.world or DEFAULT_WORLD
    root = Path(tempfile.mkdtemp(prefix="osmf-bench-loop-"))
    ports = {name: str(_free_port()) for name in ("broker", "metrics", "http", "grpc", "triton_metrics", "learner")}
    os.environ.update({
        "OSMF_DATA_DIR": str(root), "OSMF_BROKER__PORT": ports["broker"], "OSMF_STREAMS__METRICS_PORT": ports["metrics"],
        "OSMF_SERVING__HTTP_PORT": ports["http"], "OSMF_SERVING__GRPC_PORT": ports["grpc"],
        "OSMF_SERVING__METRICS_PORT": ports["triton_metrics"], "OSMF_LEARNER__METRICS_PORT": ports["learner"],
    })
    settings = load_settings()
    loop = ClosedLoop(settings, World.load(world_file), world_file, min_new_pairs=min_pairs, max_wait_s=max_wait,
                      echo=lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    try:
        loop.start()
        loop.play(minutes, rate).join()
        time.sleep(min(max_wait, 60.0))  # let a round that is due finish and go live
        delays = click_to_live(settings, loop.repo, loop.model_name)
        rounds = round_log(loop.repo, loop.model_name)
    finally:
        loop.stop()
    promoted = [r for r in rounds if r.get("decision") == "promoted"]
    round_s = [float(r.get("finished_at", 0)) - float(r.get("started_at", 0)) for r in promoted]
    figures: dict[str, Any] = {
        "world": Path(world_file).stem,
        "minutes": minutes,
        "rate": rate,
        "impressions": loop.book.impressions,
        "rounds": len(rounds),
        "promoted": len(promoted),
        "click_to_live_s_p50": round(statistics.median(delays), 1) if delays else None,
        "click_to_live_s_max": round(max(delays), 1) if delays else None,
        "round_s_p50": round(statistics.median(round_s), 1) if round_s else None,
        "ratio_round_of_click_to_live": round(statistics.median(round_s) / statistics.median(delays), 3)
        if delays and round_s else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    print_table("closed loop: click → live per promoted round",
                ["round", "pairs", "decision", "version"],
                [[r.get("round"), sum((r.get("pairs_per_group") or {}).values()), str(r.get("decision"))[:60],
                  r.get("version")] for r in rounds])
    return figures
