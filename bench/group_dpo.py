"""Group-DPO trainer speed and memory: ``GroupDPOTrainer`` beside TRL's own ``DPOTrainer`` in the same run.

Goal: Group-DPO trains at ≥ 0.9× the samples/s of plain TRL DPO on the same
model and pairs (``ratio`` = Group / TRL), and we report what each needs in
memory. One run, on a world (default: example world B):

1. *Setup.* A simulated log (``learner.pretrain.impressions`` random
   creatives, seed ``traffic_seed``), a G-MLLM built from config and
   pre-trained for a few steps only (this bench is about speed, not quality;
   default: the default model size of ``LearnerSettings()``; ``--quick``: a
   tiny model), and the preference pairs mined from the log as the stream
   worker mines them (:func:`learner.dpo.data.pairs_from_traffic`).
2. *Fits.* :func:`learner.dpo.train.fit_group_dpo` with the learner's DPO
   settings and the same number of steps, once with ``GroupDPOTrainer`` and
   once with ``trainer_class=trl.DPOTrainer`` (the same dataset and config; TRL
   ignores the group fields), repeated in the order TRL, Group, Group, TRL,
   TRL, Group … (ABBA: a slow drift of the shared machine's load hits both
   alike). Each fit runs in a *forked child process* that starts from the same
   process image — the same policy and reference weights (the child trains
   its copy-on-write view of them; the parent's stay untouched), the same
   allocator state — so neither trainer inherits the other's warmed caches or
   freed heap. Where ``fork`` is missing the fits run in this process on fresh
   ``GMLLM.copy()`` s (``isolation: "none"``).
3. *Speed.* Steady-state samples/s = pairs per step × steps between the first
   logged step ≥ ``WARMUP_STEPS`` and the last, over the time between those
   two logs (TRL's first steps, which build the dataloader and warm the
   allocator, are excluded); ``*_fit`` figures are over the whole
   ``trainer.train()`` instead. Per trainer the best repeat counts (noise on a
   shared 2-core machine only slows a run down); medians are reported too.
4. *Memory.* Peak RSS growth of a fit: the child's resident set at the start
   is the baseline, the kernel's high-water mark of the resident set
   (``VmHWM``, reset to the current RSS by writing 5 to
   ``/proc/self/clear_refs``) at the end is the peak, so every byte the trainer
   touched — optimizer state, activations, gradients, the tokenized dataset,
   Python objects — counts, at its exact peak, without sampling. Pages shared
   with the parent count in both numbers, so they cancel; before forking, the
   parent hands its free C heap back (``malloc_trim``), so a fit cannot hide
   its allocations in memory pre-training freed. (Measured in one process, a
   second fit shows a third of the first one's growth: it reuses the freed
   heap — hence one process per fit.) Where
   ``clear_refs`` cannot be written, a thread samples RSS every 5 ms instead
   (``memory_method``). Per trainer the largest growth over its repeats counts.

The two trainers differ only in which pairs a batch holds: Group-DPO's
sampler draws pairs with probability ∝ their group weight (inverse group
share), TRL's draws them uniformly; batches of other pairs have other lengths,
so part of a small gap in samples/s can be padding, not trainer overhead.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import QUICK_MODEL, BenchOptions, print_table

ROOT = Path(__file__).resolve().parents[1]
WORLD_B = ROOT / "sim" / "examples" / "world_b.yaml"
GOAL_RATIO = 0.9
WARMUP_STEPS = 3

QUICK_LEARNER: dict[str, Any] = {
    "model": QUICK_MODEL,
    "pretrain": {"impressions": 30_000, "creatives_per_product": 4, "steps": 2, "batch_size": 8,
                 "warmup_steps": 1, "feature_snapshots": 1},
}
"""``--quick``: a tiny model (~0.1M parameters); 30k impressions of 4 creatives a product give ~35 pairs on world B."""

FULL_LEARNER: dict[str, Any] = {
    "pretrain": {"steps": 20, "warmup_steps": 2, "feature_snapshots": 1},
}
"""Default run: the default model and log (300k impressions); pre-training cut to a few steps."""

QUICK_PLAN = {"steps": 20, "repeats": 2}
FULL_PLAN = {"steps": 80, "repeats": 3}
TRAINERS = ("trl", "group")


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the figures listed in the module docstring."""
    from infra.settings import LearnerSettings
    from learner.pretrain import torch_threads

    settings = LearnerSettings(**(QUICK_LEARNER if options.quick else FULL_LEARNER))
    plan = QUICK_PLAN if options.quick else FULL_PLAN
    with torch_threads(settings.threads):
        return _run(options, settings, plan["steps"], plan["repeats"])


def _run(options: BenchOptions, settings: Any, steps: int, repeats: int) -> dict[str, Any]:
    from sim.logs import traffic_from_world
    from sim.world import World
    from learner.dpo.data import pairs_from_traffic, usable_pairs
    from learner.pretrain import pretrain

    started = time.perf_counter()
    world = World.load(options.world or WORLD_B)
    p = settings.pretrain
    log, _ = traffic_from_world(
        world, n_impressions=p.impressions, seed=p.traffic_seed, creatives_per_product=p.creatives_per_product
    )
    gmllm, data, _ = pretrain(log, settings)
    features = data.features
    pairs, _ = usable_pairs(pairs_from_traffic(log), features, log.products)
    if not pairs:
        raise RuntimeError(f"no usable preference pair in {len(log.records):,} impressions of {world.name}; "
                           "simulate more impressions or fewer creatives per product")
    setup_s = time.perf_counter() - started
    dpo = settings.dpo.model_copy(update={"max_steps": steps})
    policy, reference = gmllm.copy(), gmllm.copy()
    fork = "fork" in multiprocessing.get_all_start_methods()
    gc.collect()
    _malloc_trim()  # pre-training's freed heap would otherwise sit in every child's baseline RSS

    runs: list[dict[str, Any]] = []
    for name in _order(repeats):
        trainer_class = _trainer_class(name)
        if fork:
            figures = _forked(_fit, name, trainer_class, policy, reference, pairs, features, log.products, dpo, steps)
        else:
            figures = _fit(name, trainer_class, policy.copy(), reference.copy(), pairs, features, log.products,
                           dpo, steps)
        figures["position"] = len(runs)
        runs.append(figures)

    by = {name: [r for r in runs if r["trainer"] == name] for name in TRAINERS}
    best = {name: max(r["samples_per_s"] for r in by[name]) for name in TRAINERS}
    median = {name: statistics.median(r["samples_per_s"] for r in by[name]) for name in TRAINERS}
    best_fit = {name: max(r["samples_per_s_fit"] for r in by[name]) for name in TRAINERS}
    peak = {name: max(r["peak_growth_mb"] for r in by[name]) for name in TRAINERS}
    peak_rss = {name: max(r["peak_rss_mb"] for r in by[name]) for name in TRAINERS}
    step_counts = {name: sorted({r["steps"] for r in by[name]}) for name in TRAINERS}
    parameters = int(sum(x.numel() for x in gmllm.model.parameters()))
    groups = sorted({pair.group_id for pair in pairs})
    figures = {
        "world": world.name,
        "quick": options.quick,
        "parameters": parameters,
        "impressions": len(log.records),
        "pairs": len(pairs),
        "groups": len(groups),
        "steps": steps,
        "steps_group": step_counts["group"][0] if len(step_counts["group"]) == 1 else step_counts["group"],
        "steps_trl": step_counts["trl"][0] if len(step_counts["trl"]) == 1 else step_counts["trl"],
        "batch_size": dpo.batch_size,
        "repeats": repeats,
        "warmup_steps_excluded": WARMUP_STEPS,
        "order": [r["trainer"] for r in runs],
        "isolation": "fork" if fork else "none",
        "samples_per_s_group": round(best["group"], 3),
        "samples_per_s_trl": round(best["trl"], 3),
        "ratio": round(best["group"] / best["trl"], 4),
        "goal_ratio": GOAL_RATIO,
        "samples_per_s_group_median": round(median["group"], 3),
        "samples_per_s_trl_median": round(median["trl"], 3),
        "ratio_median": round(median["group"] / median["trl"], 4),
        "samples_per_s_group_fit": round(best_fit["group"], 3),
        "samples_per_s_trl_fit": round(best_fit["trl"], 3),
        "ratio_fit": round(best_fit["group"] / best_fit["trl"], 4),
        "peak_mb_group": round(peak["group"], 1),
        "peak_mb_trl": round(peak["trl"], 1),
        "peak_mb_ratio": round(peak["group"] / peak["trl"], 4) if peak["trl"] > 0 else None,
        "peak_rss_mb_group": round(peak_rss["group"], 1),
        "peak_rss_mb_trl": round(peak_rss["trl"], 1),
        "memory_method": runs[0]["memory_method"],
        "setup_s": round(setup_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    options.output_dir.mkdir(parents=True, exist_ok=True)
    out = options.output_dir / ("group-dpo-quick.json" if options.quick else "group-dpo.json")
    out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    figures["result_file"] = str(out)

    print_table(
        f"Group-DPO vs TRL DPOTrainer ({'--quick, tiny' if options.quick else 'default'} model, {parameters:,} "
        f"parameters; {len(pairs)} pairs in {len(groups)} groups): samples/s steady (best of {repeats}), "
        f"median, whole fit; peak MB = RSS growth of a fit; goal: Group / TRL samples/s ≥ {GOAL_RATIO}",
        ["trainer", "steps", "samples/s", "median", "whole fit", "peak MB", "peak RSS MB"],
        [
            [label, figures[f"steps_{name}"], best[name], median[name], best_fit[name], round(peak[name], 1),
             round(peak_rss[name], 1)]
            for name, label in (("trl", "TRL"), ("group", "Group-DPO"))
        ]
        + [["Group / TRL", "", figures["ratio"], figures["ratio_median"], figures["ratio_fit"],
            figures["peak_mb_ratio"], ""]],
    )
    return figures


def _order(repeats: int) -> list[str]:
    """TRL, Group, Group, TRL, TRL, Group, …: each pair of runs swaps who goes first."""
    order: list[str] = []
    for index in range(repeats):
        order += list(TRAINERS if index % 2 == 0 else reversed(TRAINERS))
    return order


def _trainer_class(name: str) -> Any:
    if name == "trl":
        from trl import DPOTrainer

        return DPOTrainer
    from learner.dpo.trainer import GroupDPOTrainer

    return GroupDPOTrainer


def _fit(name: str, trainer_class: Any, policy: Any, reference: Any, pairs: Any, features: Any, products: Any,
         dpo: Any, steps: int) -> dict[str, Any]:
    """One fit: its steady-state and whole-fit samples/s and its peak memory."""
    from learner.dpo.train import fit_group_dpo

    stamps: list[tuple[int, float]] = []
    losses: list[float] = []

    def on_log(step: int, logs: dict[str, float]) -> None:
        stamps.append((step, time.perf_counter()))
        losses.append(logs["loss"])

    gc.collect()
    with PeakRSS() as memory:
        started = time.perf_counter()
        result = fit_group_dpo(policy, reference, pairs, features, products, dpo, steps=steps,
                               trainer_class=trainer_class, on_log=on_log)
        wall = time.perf_counter() - started
    steady = _steady_rate(stamps, dpo.batch_size)
    return {
        "trainer": name,
        "steps": result.steps,
        "samples_per_s": round(steady if steady is not None else result.samples_per_s, 3),
        "samples_per_s_fit": round(result.samples_per_s, 3),
        "train_s": round(result.seconds, 2),
        "fit_wall_s": round(wall, 2),
        "peak_growth_mb": round(memory.growth_mb, 1),
        "peak_rss_mb": round(memory.peak_mb, 1),
        "memory_method": memory.method,
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(losses[-1], 4) if losses else None,
    }


def _steady_rate(stamps: list[tuple[int, float]], batch_size: int) -> float | None:
    """Samples/s between the first log at step ≥ ``WARMUP_STEPS`` and the last log; None with too few logs."""
    steady = [(step, t) for step, t in stamps if step >= WARMUP_STEPS]
    if len(steady) < 2 or steady[-1][0] <= steady[0][0]:
        return None
    (first_step, first_t), (last_step, last_t) = steady[0], steady[-1]
    return (last_step - first_step) * batch_size / (last_t - first_t)


def _forked(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a forked child process; its result (or its traceback, raised here)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(send, fn, args), daemon=True)
    # the tokenizer was trained with parallelism here; tell its fork hook it is configured off (no warning)
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        child.start()
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"the benchmark's fit process died (exit code {child.exitcode})") from None
    finally:
        receive.close()
    child.join()
    if status != "ok":
        raise RuntimeError(f"the benchmark's fit process failed:\n{payload}")
    return payload


def _child_main(send: Any, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    try:
        send.send(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()


class PeakRSS:
    """Peak resident memory of this process over a ``with`` block, and its growth over the RSS at the start.

    Linux: the kernel's high-water mark ``VmHWM``, reset to the current RSS at
    the start by writing 5 to ``/proc/self/clear_refs`` (exact, no sampling).
    Elsewhere, or where that file cannot be written: RSS sampled every 5 ms by
    a thread (``psutil``), which can miss a peak shorter than that.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.method = "vmhwm"
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def growth_mb(self) -> float:
        """Peak minus the RSS at the start (MB)."""
        return max(0.0, self.peak_mb - self.start_mb)

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.start_mb = _proc_status_mb("VmRSS")
        except OSError:
            self.method = "sampled"
            self.start_mb = self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak_mb = _proc_status_mb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, _rss_mb())


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the system (glibc), so a fit's RSS growth is its own allocations."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise OSError(f"no {field} in /proc/self/status")


def _rss_mb() -> float:
    import psutil  # type: ignore[import-untyped]  # installed with accelerate

    return psutil.Process().memory_info().rss / 2**20
