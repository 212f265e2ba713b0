"""``osmf learner``: pre-train the G-MLLM on logged traffic, sample creatives from it, run the learner loop.

Heavy libraries (torch, transformers) are imported inside the commands so
``osmf --help`` stays instant.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import friendly_errors, load_settings, load_world, ready_bootstrap

learner_app = typer.Typer(
    help="The G-MLLM: pre-training on logged traffic (four tasks), sampling creative prompts, the learner loop "
    "(Group-DPO on streamed preference pairs, gate, publish).",
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


def learner_overrides(settings: Any, section: str, **values: Any) -> Any:
    """``settings.learner`` with the command-line values (None: not given) of one section applied and validated."""
    from pydantic import ValidationError

    from infra.settings import ConfigError, LearnerSettings, describe_validation_error

    data = settings.learner.model_dump()
    data[section].update({k: v for k, v in values.items() if v is not None})
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
            help="Train on a JSON-lines file of impression and click events (the wire format of infra/contracts/events.py); "
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

    from learner.pretrain import run_pretraining
    from learner.service import pretrain_run_dir

    if sum(x is not None for x in (traffic, events)) > 1:
        typer.echo("error: give at most one of --traffic and --events", err=True)
        raise typer.Exit(2)
    settings = load_settings()
    learner = learner_overrides(
        settings,
        "pretrain",
        impressions=impressions,
        creatives_per_product=creatives_per_product,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        tasks=_parse_tasks(tasks) if tasks else None,
    )
    run_dir = out or pretrain_run_dir(settings)
    console = Console(stderr=True)
    started = time.perf_counter()
    log, source = _training_log(settings, learner, world, traffic, events, console)
    columns = [TextColumn("[3/4] pre-training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[last]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("train", total=learner.pretrain.steps, last="")

        def on_step(step: int, name: str, loss: float) -> None:
            progress.update(bar, completed=step, last=f"{name} loss {loss:.3f}")

        report = run_pretraining(log, learner, run_dir, holdout=holdout, source=source, save_traffic=save_traffic,
                                 on_step=on_step, echo=console.print)
    console.print(_pretrain_table(report, time.perf_counter() - started))
    for group, text in report.examples.items():
        console.print(f"  {group}: {text}")
    typer.echo(str(report.files["model"]))


def _training_log(settings: Any, learner: Any, world: Path | None, traffic: Path | None, events: Path | None,
                  console: Any) -> tuple[Any, str]:
    """The log to pre-train on (saved, from events, or simulated) and a description of it."""
    from rich.progress import Progress

    from learner.data import TrafficError, TrafficLog
    from sim.logs import read_event_file, traffic_from_events, traffic_from_world
    from sim.simulate import world_path

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
        path = world_path(settings, world)
        loaded = load_world(path)
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
    return log, source


def _pretrain_table(report: Any, seconds: float) -> Any:
    from rich.table import Table

    result = report.result
    table = Table(title=f"pre-training summary ({seconds:.0f} s in all)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("steps (steps/s)", f"{result.steps} ({result.steps_per_s:.2f}/s, {result.seconds:.0f} s)"),
        ("peak memory (RSS)", f"{result.peak_rss_mb:.0f} MB"),
        ("held-out click AUC", f"{report.auc:.3f}"),
    ]
    rows += [(f"prompt parse rate, {label}", f"{rate:.1%} of {n}") for label, (rate, n) in report.parse_rates.items()]
    first = result.first_losses()
    for name, loss in sorted(result.final_losses().items()):
        rows.append((f"loss {name} (first → last)", f"{first.get(name, float('nan')):.3f} → {loss:.3f}"))
    for label, value in rows:
        table.add_row(label, value)
    return table


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
    from features.group import read_group_features
    from learner.model.gmllm import GMLLM
    from learner.service import pretrain_run_dir

    settings = load_settings()
    root = run or pretrain_run_dir(settings)
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


RUN_HELP = """Run the learner loop: follow the preference-pairs topic, train when enough new pairs (or time) have
accumulated, gate each candidate against the live version, publish it atomically as the next version.

The pairs topic is re-read from its first offset at every start (the replay buffer deduplicates, so a restart
loses nothing). Without a published version in the repository, --base is published as version 1 first.
Malformed pair messages go to the dead-letter topic with the reason; pairs of unknown products or of groups
without features are skipped and counted. Ctrl-C (or SIGTERM) stops after the round in progress; a second
Ctrl-C aborts it, and an aborted round publishes nothing."""


@learner_app.command("run", help=RUN_HELP)
@friendly_errors
def run_command(
    base: Annotated[
        Path | None,
        typer.Option(
            help="Initial model, published as version 1 when the repository has none: a pre-training run "
            "directory (model/ + traffic/, from `osmf learner pretrain`) or a model artifact directory. "
            "Once versions are published it only supplies the catalogue (its traffic/). "
            "Default: the default pre-training run, if it exists.",
        ),
    ] = None,
    traffic: Annotated[
        Path | None,
        typer.Option(
            help="Traffic log directory: the product catalogue (with images) and the group features used when the "
            "feature store has none. Default: traffic/ of the --base run (or beside the model directory)."
        ),
    ] = None,
    world: Annotated[
        Path | None,
        typer.Option(
            "--world", "-w",
            help="Also judge each candidate by the simulated CTR per group of the creatives it serves in this world "
            "(schema: docs/world.md); the gate then uses it. Default: no simulated CTR.",
        ),
    ] = None,
    once: Annotated[
        bool,
        typer.Option("--once", help="Read what the pairs topic holds, run at most one round (if any pair is new), "
                     "print the summary and exit (for cron jobs and tests)."),
    ] = False,
    one_size: Annotated[
        bool,
        typer.Option("--one-size", help="Baseline: one-size-fits-all DPO (pairs pooled under a neutral prefix, "
                     "uniform weights, no group features)."),
    ] = False,
    min_new_pairs: Annotated[
        int | None,
        typer.Option(help="Train once this many new pairs have arrived (default: settings, "
                     "learner.loop.min_new_pairs).", min=1),
    ] = None,
    max_wait_s: Annotated[
        float | None,
        typer.Option(help="... or once this many seconds have passed since the last round with at least one new "
                     "pair (default: settings, learner.loop.max_wait_s).", min=0.001),
    ] = None,
    repository: Annotated[
        Path | None,
        typer.Option(help="Model repository: versions go to <repository>/<model name>/<n>/ with LATEST.json "
                     "(default: settings, learner.loop.model_repository, else <data_dir>/models)."),
    ] = None,
    history: Annotated[
        Path | None,
        typer.Option(help="Round log (one JSON object per round; the dashboard reads it). "
                     "Default: <repository>/<model name>/rounds.jsonl."),
    ] = None,
    max_rounds: Annotated[
        int | None, typer.Option(help="Stop after this many rounds (default: run until stopped).", min=1)
    ] = None,
    idle_exit_s: Annotated[
        float | None,
        typer.Option(help="Exit after this many seconds without a new pair while no round is due "
                     "(default: run until stopped).", min=0.001),
    ] = None,
) -> None:
    """The learner service (see ``osmf learner run --help``)."""
    from learner.loop import history_path
    from learner.service import LearnerService, ServiceOptions, model_repository

    settings = load_settings()
    learner = learner_overrides(settings, "loop", min_new_pairs=min_new_pairs, max_wait_s=max_wait_s)
    repo = repository or model_repository(settings)
    log_file = history or history_path(repo, learner.loop.model_name)
    _use_threads(learner.threads)
    bootstrap = ready_bootstrap(settings)
    judge_factory = None
    if world is not None:
        from sim.judge import world_judge_factory

        judge_factory = world_judge_factory(load_world(world), settings, learner)
    service = LearnerService(
        settings, learner, bootstrap, repo, log_file, base=base, traffic=traffic, judge_factory=judge_factory,
        options=ServiceOptions(once=once, one_size=one_size, max_rounds=max_rounds, idle_exit_s=idle_exit_s),
        echo=lambda text: typer.echo(f"learner: {text}"),
    )
    result = service.run()
    _print_run_summary(result)
    raise typer.Exit(result.code)


def _print_run_summary(result: Any) -> None:
    loop, topic, dead_topic = result.loop, result.topic, result.dead_letter_topic
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    if loop.rounds:
        table = Table(title=f"learner rounds (live version {loop.version})")
        for column in ("round", "train pairs", "held-out", "groups", "steps", "seconds", "decision", "version"):
            table.add_column(column, justify="left" if column == "decision" else "right")
        for r in (lineage for summary in loop.rounds for lineage in (summary.lineages or (summary,))):
            table.add_row(str(r.number), str(r.train_pairs), str(r.heldout_pairs), str(r.groups), str(r.steps),
                          f"{r.seconds:.1f}", r.decision, str(r.version))
        console.print(table)
    c = loop.counts
    lines = [f"pairs read from {topic}: {c.offered} ({c.new} kept as new, {c.duplicates} duplicates)",
             f"malformed messages: {result.malformed} ({result.dead_lettered} sent to {dead_topic}, "
             f"{result.malformed - result.dead_lettered} already there)"]
    if c.unknown_product:
        shown = ", ".join(f"{p} ({n})" for p, n in c.unknown_product_ids.most_common(5))
        lines.append(f"skipped, product not in the catalogue: {c.unknown_product} ({shown})")
    if c.unknown_group:
        shown = ", ".join(f"{g} ({n})" for g, n in c.unknown_group_ids.most_common(5))
        lines.append(f"left out of the last round, group without features: {c.unknown_group} ({shown})")
    lines.append(f"rounds run: {len(loop.rounds)}; live version {loop.version}; history: {loop.history}")
    routed = getattr(loop, "routing", None)
    if routed is not None and routed.groups:
        lines.append("groups served by another version (per-group promotion): "
                     + ", ".join(f"{g} -> v{v}" for g, v in sorted(routed.groups.items())))
    for line in lines:
        typer.echo(line)


def _use_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
