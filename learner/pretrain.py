"""Pre-training the G-MLLM on logged traffic with the paper's four tasks.

=============  ==============================================  ===============================================
task           input                                           target
=============  ==============================================  ===============================================
``group``      group prefix                                    the group's preferences in words
``click``      group prefix, product image + text, a creative  ``yes`` / ``no`` (soft: the cell's click share)
``product``    product image                                   colour, category, title and price
``generate``   group prefix, product image + text              a logged creative prompt, drawn by its lift
=============  ==============================================  ===============================================

The examples and their weights are drawn as :mod:`learner.corpus` describes.
Every step trains one task, drawn from the mixture; the loss of each task is
logged and plotted.
"""

from __future__ import annotations

import math
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.settings import LearnerSettings, PretrainSettings
from learner.corpus import (  # noqa: F401 - the data half of pre-training, re-exported
    PRIOR_CLICKS,
    PretrainData,
    attribute_lift,
    feature_snapshots,
    prepare_data,
    pretraining_corpus,
    split_holdout,
)
from learner.data import TrafficLog
from learner.model.gmllm import GMLLM
from learner.model.inputs import (
    group_description,
    product_description,
    task_segments,
)


@dataclass
class PretrainResult:
    """What a pre-training run did: steps, time, peak memory and the loss history per task."""

    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    examples_seen: dict[str, int] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        """Optimizer steps per second of training."""
        return self.steps / self.seconds if self.seconds else 0.0

    def final_losses(self) -> dict[str, float]:
        """Last logged loss of each task."""
        last: dict[str, float] = {}
        for row in self.history:
            last.update({task: loss for task, loss in row["loss"].items()})
        return last

    def first_losses(self) -> dict[str, float]:
        """First logged loss of each task."""
        first: dict[str, float] = {}
        for row in self.history:
            for task, loss in row["loss"].items():
                first.setdefault(task, loss)
        return first


class Pretrainer:
    """Trains a :class:`GMLLM` on :class:`PretrainData` with the task mixture of :class:`PretrainSettings`."""

    def __init__(self, gmllm: GMLLM, data: PretrainData, settings: PretrainSettings) -> None:
        self.gmllm = gmllm
        self.data = data
        self.settings = settings
        mixture = {t: w for t, w in settings.tasks.items() if w > 0 and t in data.pools}
        if not mixture:
            raise ValueError("no task has both a positive weight and examples in the log")
        self.tasks = sorted(mixture)
        total = sum(mixture.values())
        self.task_p = np.array([mixture[t] / total for t in self.tasks])
        self.rng = np.random.default_rng(settings.seed)

    def batch(self, task: str) -> dict[str, Any]:
        """One training batch of ``task``: padded ids, targets and pixel values."""
        data, gm = self.data, self.gmllm
        items = data.pools[task].draw(self.rng, self.settings.batch_size)
        prompts, completions, targets, products = [], [], [], []
        for item in items:
            snapshot = data.snapshots[self.rng.choice(len(data.snapshots), p=data.snapshot_weights)]
            if task == "group":
                features = snapshot[item[0]]
                prompts.append(gm.encode(task_segments("group", group=features)))
                completions.append(gm.encode_completion(group_description(features)))
            elif task == "product":
                product = data.traffic.products[item[0]]
                prompts.append(gm.encode(task_segments("product", product=product)))
                completions.append(gm.encode_completion(product_description(product)))
                products.append(product)
            elif task == "click":
                group, product_id, prompt, target = item
                product = data.traffic.products[product_id]
                prompts.append(gm.encode(task_segments("click", group=snapshot[group], product=product, creative=prompt)))
                targets.append(target)
                products.append(product)
            else:
                group, product_id, prompt = item
                product = data.traffic.products[product_id]
                prompts.append(gm.encode(task_segments("generate", group=snapshot[group], product=product)))
                completions.append(gm.encode_completion(prompt))
                products.append(product)
        pixels = torch.stack([gm.pixel_values(p) for p in products]) if products else None
        return {"prompts": prompts, "completions": completions, "targets": targets, "pixels": pixels}

    def loss(self, task: str, batch: dict[str, Any]) -> torch.Tensor:
        """Loss of one batch: soft yes/no cross-entropy for ``click``, completion-token cross-entropy otherwise."""
        gm = self.gmllm
        if task == "click":
            return gm.click_loss(batch["prompts"], batch["pixels"], batch["targets"])
        sequences = [p + c for p, c in zip(batch["prompts"], batch["completions"])]
        input_ids, attention = gm.pad(sequences)
        labels = torch.full_like(input_ids, -100)
        for row, (p, c) in enumerate(zip(batch["prompts"], batch["completions"])):
            labels[row, len(p) : len(p) + len(c)] = torch.tensor(c)
        out = gm.model(input_ids=input_ids, attention_mask=attention, pixel_values=batch["pixels"], use_cache=False)
        logits = out.logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )

    def train(self, on_step: Callable[[int, str, float], None] | None = None) -> PretrainResult:
        """Run ``settings.steps`` optimizer steps; ``on_step(step, task, loss)`` after each."""
        settings, model = self.settings, self.gmllm.model
        torch.manual_seed(settings.seed)
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings.warmup_steps, settings.steps))
        window: dict[str, list[float]] = defaultdict(list)
        result = PretrainResult(steps=settings.steps, seconds=0.0)
        seen: dict[str, int] = defaultdict(int)
        start = time.perf_counter()
        for step in range(1, settings.steps + 1):
            task = self.tasks[int(self.rng.choice(len(self.tasks), p=self.task_p))]
            loss = self.loss(task, self.batch(task))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            value = float(loss.detach())
            window[task].append(value)
            seen[task] += settings.batch_size
            if on_step is not None:
                on_step(step, task, value)
            if step % settings.log_every == 0 or step == settings.steps:
                result.history.append(
                    {"step": step, "lr": schedule.get_last_lr()[0],
                     "loss": {t: float(np.mean(v)) for t, v in sorted(window.items())}}
                )
                window.clear()
        model.eval()
        result.seconds = time.perf_counter() - start
        result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        result.examples_seen = dict(seen)
        return result


def _schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain(
    traffic: TrafficLog,
    settings: LearnerSettings,
    on_step: Callable[[int, str, float], None] | None = None,
) -> tuple[GMLLM, PretrainData, PretrainResult]:
    """Build the G-MLLM (tokenizer trained on this log's texts) and pre-train it on ``traffic``."""
    with torch_threads(settings.threads):
        data = prepare_data(traffic, settings.pretrain)
        corpus = pretraining_corpus(traffic, data.snapshots)
        gmllm = GMLLM.build(settings.model, corpus=corpus, seed=settings.pretrain.seed)
        result = Pretrainer(gmllm, data, settings.pretrain).train(on_step)
    return gmllm, data, result


def plot_losses(result: PretrainResult, path: str | Path, title: str = "G-MLLM pre-training") -> Path:
    """Loss per task against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    tasks = sorted({t for row in result.history for t in row["loss"]})
    for task in tasks:
        points = [(row["step"], row["loss"][task]) for row in result.history if task in row["loss"]]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=task)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (mean over the logging window)")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target)
    plt.close(figure)
    return target


def write_run(
    directory: str | Path,
    gmllm: GMLLM,
    result: PretrainResult,
    summary: dict[str, Any],
) -> dict[str, Path]:
    """Save a pre-training run: the model artifact, the loss history (JSON), the loss plot (PNG), a summary."""
    import json

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = gmllm.save(root / "model", extra={"pretrain": {**summary, "final_losses": result.final_losses()}})
    history = root / "history.json"
    history.write_text(json.dumps(result.history, indent=1) + "\n", encoding="utf-8")
    plot = plot_losses(result, root / "loss.png")
    summary_file = root / "summary.json"
    summary_file.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return {"model": model_dir, "history": history, "plot": plot, "summary": summary_file}


@dataclass
class PretrainReport:
    """What :func:`run_pretraining` did: the run's figures, its files and one example prompt per group."""

    summary: dict[str, Any]
    files: dict[str, Path]
    result: PretrainResult
    examples: dict[str, str]
    auc: float
    parse_rates: dict[str, tuple[float, int]]
    """Label -> (parse rate, number of samples) for raw and constrained sampling."""


def run_pretraining(
    log: TrafficLog,
    settings: LearnerSettings,
    run_dir: str | Path,
    *,
    holdout: float = 0.1,
    source: str = "",
    save_traffic: bool = True,
    on_step: Callable[[int, str, float], None] | None = None,
    echo: Callable[[str], None] = print,
) -> PretrainReport:
    """Pre-train on ``log``, measure the result and save the run under ``run_dir`` (``osmf learner pretrain``).

    The last ``holdout`` share of the log (by time) is held out for the click
    AUC; raw and constrained sampling are measured on two products per group.
    """
    from learner.evaluate import click_auc, parse_rate

    train_log, held_log = split_holdout(log, holdout) if holdout > 0 else (log, log.subset([]))
    echo(f"[1/4] log: {source}; {len(train_log.records):,} records for training, "
         f"{len(held_log.records):,} held out; groups: {', '.join(train_log.groups())}")
    with torch_threads(settings.threads):
        data = prepare_data(train_log, settings.pretrain)
        gmllm = GMLLM.build(settings.model, corpus=pretraining_corpus(train_log, data.snapshots),
                            seed=settings.pretrain.seed)
        params = sum(p.numel() for p in gmllm.model.parameters())
        echo(f"[2/4] model: {gmllm.info.get('base')}, {params / 1e6:.2f}M parameters, "
             f"vocabulary {len(gmllm.tokenizer)}, {gmllm.image_tokens} image tokens")
        result = Pretrainer(gmllm, data, settings.pretrain).train(on_step)
        held_cells = held_log.cells()
        auc = click_auc(gmllm, data.features, train_log.products, held_cells)[0] if held_cells else float("nan")
        samples, examples = _sample_prompts(gmllm, data, train_log, settings)
    temperature = settings.generation.temperature
    rates = {
        "raw sampling T=1": (parse_rate(samples["raw_t1"]), len(samples["raw_t1"])),
        f"raw sampling T={temperature:g}": (parse_rate(samples["raw"]), len(samples["raw"])),
        "constrained": (parse_rate(samples["constrained"]), len(samples["constrained"])),
    }
    summary = {
        "source": source,
        "records_train": len(train_log.records),
        "records_held_out": len(held_log.records),
        "groups": train_log.groups(),
        "parameters": params,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "steps_per_s": round(result.steps_per_s, 3),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "held_out_click_auc": round(auc, 4),
        "raw_parse_rate": round(parse_rate(samples["raw"]), 4),
        "raw_parse_rate_t1": round(parse_rate(samples["raw_t1"]), 4),
        "sampling_temperature": temperature,
        "constrained_parse_rate": round(parse_rate(samples["constrained"]), 4),
        "tasks": settings.pretrain.tasks,
        "first_losses": result.first_losses(),
        "final_losses": result.final_losses(),
    }
    files = write_run(run_dir, gmllm, result, summary)
    if save_traffic:
        train_log.save(Path(run_dir) / "traffic")
    echo(f"[4/4] saved the model to {files['model']} and the loss plot to {files['plot']}")
    return PretrainReport(summary, files, result, examples, auc, rates)


def _sample_prompts(
    gmllm: GMLLM, data: PretrainData, log: TrafficLog, settings: LearnerSettings
) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """Raw (T=1 and the serving temperature) and constrained samples for two products per group; one example each."""
    pairs = [(g, p) for g, f in sorted(data.features.items())
             for p in sorted(pid for pid, prod in log.products.items() if prod.category == f.category)[:2]]
    temperature, limit = settings.generation.temperature, settings.generation.max_new_tokens
    samples: dict[str, list[Any]] = {"raw": [], "raw_t1": [], "constrained": []}
    examples: dict[str, str] = {}
    for group, product in pairs:
        features, record = data.features[group], log.products[product]
        samples["raw_t1"] += gmllm.generate(features, record, n=4, seed=1, temperature=1.0, constrained=False,
                                            max_new_tokens=limit)
        samples["raw"] += gmllm.generate(features, record, n=4, seed=1, temperature=temperature, constrained=False,
                                         max_new_tokens=limit)
        made = gmllm.generate(features, record, n=4, seed=1, temperature=temperature, max_new_tokens=limit)
        samples["constrained"] += made
        examples.setdefault(group, made[0].text)
    return samples, examples
