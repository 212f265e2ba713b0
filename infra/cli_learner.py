"""``osmf learner``: pre-train the G-MLLM on logged traffic and sample creatives from it.

Heavy libraries (torch, transformers) are imported inside the commands so
``osmf --help`` stays instant.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """The ``osmf`` error handling (one line on stderr, exit 2), plus the learner's own user errors."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from infra.cli import friendly_errors as osmf_errors
        from learner.data import TrafficError
        from learner.model.artifact import ArtifactError

        try:
            return osmf_errors(func)(*args, **kwargs)
        except (ArtifactError, TrafficError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]

learner_app = typer.Typer(
    help="The G-MLLM: pre-training on logged traffic (four tasks), sampling creative prompts.",
    no_args_is_help=True,
)

TASK_HELP = (
    "Task mixture as task=weight pairs, e.g. 'group=0.1,click=0.35,product=0.1,generate=0.45' "
    "(tasks: group analysis, click prediction, product comprehension, prompt generation; weights are "
    "normalised, 0 switches a task off). Default: settings (learner.pretrain.tasks)."
)


def _parse_tasks(text: str) -> dict[str, float]:
    tasks: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise typer.BadParameter(f"{part!r}: write task=weight, e.g. click=0.5")
        try:
            tasks[name.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{part!r}: the weight must be a number") from None
    return tasks


def _learner_settings(settings: Any, **pretrain: Any) -> Any:
    """settings.learner with the command-line overrides applied and validated."""
    from pydantic import ValidationError

    from infra.settings import ConfigError, LearnerSettings, describe_validation_error

    data = settings.learner.model_dump()
    data["pretrain"].update({k: v for k, v in pretrain.items() if v is not None})
    try:
        return LearnerSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source="options")) from None


@learner_app.command("pretrain")
@friendly_errors
def pretrain_command(
    world: Annotated[
        Path | None,
        typer.Option(
            "--world", "-w",
            help="Simulate the training log in this world (schema: docs/world.md); default: settings, else "
            "example world A. Ignored with --traffic or --events.",
        ),
    ] = None,
    traffic: Annotated[
        Path | None,
        typer.Option(help="Train on a saved traffic log directory (learner/data.py format) instead of simulating."),
    ] = None,
    events: Annotated[
        Path | None,
        typer.Option(
            help="Train on a JSON-lines file of impression and click events (the wire format of streams/events.py); "
            "users are grouped as the stream worker groups them. Products have no images then."
        ),
    ] = None,
    impressions: Annotated[
        int | None, typer.Option(help="Impressions to simulate with --world (default: settings).", min=100)
    ] = None,
    creatives_per_product: Annotated[
        int | None, typer.Option(help="Random creatives per product in the simulated log (default: settings).", min=1)
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: settings).", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step (default: settings).", min=1)] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Peak learning rate, cosine decay (default: settings).", min=0.0)
    ] = None,
    tasks: Annotated[str | None, typer.Option(help=TASK_HELP)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the weights and the example order (default: settings).")] = None,
    holdout: Annotated[
        float,
        typer.Option(help="Last share of the log (by time) held out for the summary's click AUC.", min=0.0, max=0.5),
    ] = 0.1,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run directory (model/, traffic/, loss.png, history.json, summary.json); replaced if it exists. "
            "Default: learner.output_dir, else <data_dir>/learner/pretrain."
        ),
    ] = None,
    save_traffic: Annotated[
        bool, typer.Option(help="Also save the training log under the run directory (traffic/).")
    ] = True,
) -> None:
    """Pre-train the G-MLLM on logged traffic with the four tasks; save the model, loss plot and summary."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from infra.demo import world_path
    from infra.logs import read_event_file, traffic_from_events, traffic_from_world

    if sum(x is not None for x in (traffic, events)) > 1:
        typer.echo("error: give at most one of --traffic and --events", err=True)
        raise typer.Exit(2)
    settings = _settings_or_exit()
    learner = _learner_settings(
        settings,
        impressions=impressions,
        creatives_per_product=creatives_per_product,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        tasks=_parse_tasks(tasks) if tasks else None,
    )
    run_dir = out or learner.output_dir or settings.data_dir / "learner" / "pretrain"
    _use_threads(learner.threads)
    console = Console(stderr=True)
    started = time.perf_counter()

    from learner.data import TrafficError, TrafficLog

    if traffic is not None:
        try:
            log = TrafficLog.load(traffic)
        except TrafficError as exc:
            typer.echo(f"error: --traffic: {exc}", err=True)
            raise typer.Exit(2) from None
        source = f"traffic log {traffic}"
    elif events is not None:
        if not events.is_file():
            typer.echo(f"error: --events {events}: no such file; give a JSON-lines event file", err=True)
            raise typer.Exit(2)
        parsed, bad = read_event_file(events)
        for line in bad[:10]:
            typer.echo(f"skipped {line}", err=True)
        log, _ = traffic_from_events(parsed)
        source = f"event log {events} ({len(parsed)} events, {len(bad)} bad lines skipped)"
    else:
        from infra.cli import _load_world

        path = world_path(settings, world)
        loaded = _load_world(path)
        total = learner.pretrain.impressions
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"simulating {total:,} impressions in {path.name}", total=None)
            log, _ = traffic_from_world(
                loaded,
                n_impressions=total,
                seed=learner.pretrain.traffic_seed,
                creatives_per_product=learner.pretrain.creatives_per_product,
                on_event=lambda: progress.advance(task),
            )
        source = f"world {path.name}, {total:,} simulated impressions"
    if not log.records:
        typer.echo("error: the log has no impressions; nothing to learn from", err=True)
        raise typer.Exit(2)

    from learner.evaluate import click_auc, parse_rate
    from learner.pretrain import Pretrainer, prepare_data, pretraining_corpus, split_holdout, write_run
    from learner.model.gmllm import GMLLM

    train_log, held_log = split_holdout(log, holdout) if holdout > 0 else (log, log.subset([]))
    console.print(f"[1/4] log: {source}; {len(train_log.records):,} records for training, "
                  f"{len(held_log.records):,} held out; groups: {', '.join(train_log.groups())}")
    data = prepare_data(train_log, learner.pretrain)
    gmllm = GMLLM.build(learner.model, corpus=pretraining_corpus(train_log, data.snapshots), seed=learner.pretrain.seed)
    params = sum(p.numel() for p in gmllm.model.parameters())
    console.print(f"[2/4] model: {gmllm.info.get('base')}, {params / 1e6:.2f}M parameters, "
                  f"vocabulary {len(gmllm.tokenizer)}, {gmllm.image_tokens} image tokens")
    trainer = Pretrainer(gmllm, data, learner.pretrain)
    columns = [TextColumn("[3/4] pre-training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[last]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("train", total=learner.pretrain.steps, last="")

        def on_step(step: int, name: str, loss: float) -> None:
            progress.update(bar, completed=step, last=f"{name} loss {loss:.3f}")

        result = trainer.train(on_step)

    held_cells = held_log.cells()
    auc = float("nan")
    if held_cells:
        auc, _ = click_auc(gmllm, data.features, train_log.products, held_cells)
    pairs = [(g, p) for g, f in sorted(data.features.items())
             for p in sorted(pid for pid, prod in train_log.products.items() if prod.category == f.category)[:2]]
    temperature = learner.generation.temperature
    raw, raw_t1, constrained, examples = [], [], [], {}
    for group, product in pairs:
        features, record = data.features[group], train_log.products[product]
        limit = learner.generation.max_new_tokens
        raw_t1 += gmllm.generate(features, record, n=4, seed=1, temperature=1.0, constrained=False, max_new_tokens=limit)
        raw += gmllm.generate(features, record, n=4, seed=1, temperature=temperature, constrained=False,
                              max_new_tokens=limit)
        made = gmllm.generate(features, record, n=4, seed=1, temperature=temperature, max_new_tokens=limit)
        constrained += made
        examples.setdefault(group, made[0].text)
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
        "raw_parse_rate": round(parse_rate(raw), 4),
        "raw_parse_rate_t1": round(parse_rate(raw_t1), 4),
        "sampling_temperature": temperature,
        "constrained_parse_rate": round(parse_rate(constrained), 4),
        "tasks": learner.pretrain.tasks,
        "first_losses": result.first_losses(),
        "final_losses": result.final_losses(),
    }
    files = write_run(run_dir, gmllm, result, summary)
    if save_traffic:
        train_log.save(Path(run_dir) / "traffic")
    console.print(f"[4/4] saved the model to {files['model']} and the loss plot to {files['plot']}")

    table = Table(title=f"pre-training summary ({time.perf_counter() - started:.0f} s in all)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("steps (steps/s)", f"{result.steps} ({result.steps_per_s:.2f}/s, {result.seconds:.0f} s)"),
        ("peak memory (RSS)", f"{result.peak_rss_mb:.0f} MB"),
        ("held-out click AUC", f"{auc:.3f}"),
        ("prompt parse rate, raw sampling T=1", f"{parse_rate(raw_t1):.1%} of {len(raw_t1)}"),
        (f"prompt parse rate, raw sampling T={temperature:g}", f"{parse_rate(raw):.1%} of {len(raw)}"),
        ("prompt parse rate, constrained", f"{parse_rate(constrained):.1%} of {len(constrained)}"),
    ]
    first = result.first_losses()
    for name, loss in sorted(result.final_losses().items()):
        rows.append((f"loss {name} (first → last)", f"{first.get(name, float('nan')):.3f} → {loss:.3f}"))
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    for group, text in examples.items():
        console.print(f"  {group}: {text}")
    typer.echo(str(files["model"]))


@learner_app.command("generate")
@friendly_errors
def generate_command(
    run: Annotated[
        Path | None,
        typer.Option(help="Run directory of `osmf learner pretrain` (model/ and traffic/). Default: its default."),
    ] = None,
    group: Annotated[str | None, typer.Option(help="Only this group id, e.g. lipstick/g0 (default: every group).")] = None,
    product: Annotated[str | None, typer.Option(help="Only this product id (default: the group's first product).")] = None,
    count: Annotated[int, typer.Option(help="Prompts sampled per (group, product).", min=1)] = 4,
    seed: Annotated[int, typer.Option(help="Sampling seed: same model and seed, same prompts.")] = 0,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default: settings).", min=0.0)] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Unconstrained sampling (shows what the model writes unaided).")] = False,
) -> None:
    """Sample creative prompts from a pre-trained model for its logged groups and products."""
    from learner.data import TrafficLog
    from learner.group_features import read_group_features
    from learner.model.gmllm import GMLLM

    settings = _settings_or_exit()
    root = run or settings.learner.output_dir or settings.data_dir / "learner" / "pretrain"
    if not (root / "model").is_dir() or not (root / "traffic").is_dir():
        typer.echo(f"error: {root}: no model/ and traffic/ here; run `osmf learner pretrain` first", err=True)
        raise typer.Exit(2)
    _use_threads(settings.learner.threads)
    gmllm = GMLLM.load(root / "model")
    log = TrafficLog.load(root / "traffic")
    features = read_group_features(log)
    if group is not None and group not in features:
        typer.echo(f"error: --group {group}: unknown; groups: {', '.join(sorted(features))}", err=True)
        raise typer.Exit(2)
    if product is not None and product not in log.products:
        typer.echo(f"error: --product {product}: not in the log's catalogue", err=True)
        raise typer.Exit(2)
    for gid in [group] if group else sorted(features):
        f = features[gid]
        pid = product or next(p for p in sorted(log.products) if log.products[p].category == f.category)
        made = gmllm.generate(
            f, log.products[pid], n=count, seed=seed, constrained=not raw,
            temperature=settings.learner.generation.temperature if temperature is None else temperature,
            max_new_tokens=settings.learner.generation.max_new_tokens,
        )
        for generation in made:
            mark = "" if generation.valid else "   (does not parse)"
            typer.echo(f"{gid}\t{pid}\t{generation.text}{mark}")


def _use_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def _settings_or_exit() -> Any:
    from infra.cli import _settings

    return _settings()
