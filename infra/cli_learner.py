"""``osmf learner``: pre-train the G-MLLM on logged traffic, sample creatives from it, run the learner loop.

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
    from infra.settings import ConfigError, LearnerSettings, describe_validation_error
    from learner.loop import history_path

    settings = _settings_or_exit()
    data = settings.learner.model_dump()
    data["loop"].update({k: v for k, v in {"min_new_pairs": min_new_pairs, "max_wait_s": max_wait_s}.items()
                         if v is not None})
    from pydantic import ValidationError

    try:
        learner = LearnerSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source="options")) from None
    repo = repository or learner.loop.model_repository or settings.data_dir / "models"
    log_file = history or history_path(repo, learner.loop.model_name)
    _use_threads(learner.threads)
    bootstrap = _broker_or_exit(settings)
    raise typer.Exit(_run_learner(settings, learner, bootstrap, repo, log_file, base=base, traffic=traffic,
                                  world=world, once=once, one_size=one_size, max_rounds=max_rounds,
                                  idle_exit_s=idle_exit_s))


def _broker_or_exit(settings: Any) -> str:
    """The bootstrap address of a broker that answers, with the product's topics created."""
    from streams.kafka import ensure_topics, kafka_reachable

    bootstrap = settings.bootstrap_servers
    if not kafka_reachable(bootstrap):
        typer.echo(f"error: no Kafka broker answers at {bootstrap}; start the embedded one with `osmf broker start` "
                   "or set OSMF_KAFKA_BOOTSTRAP to your cluster", err=True)
        raise typer.Exit(2)
    ensure_topics(bootstrap, settings.topics.all_names(), settings.topics.partitions)
    return bootstrap


def _base_paths(settings: Any, base: Path | None, traffic: Path | None) -> tuple[Path | None, Path | None]:
    """(model artifact directory or None, traffic log directory or None) from --base / --traffic / the defaults."""
    from learner.model.artifact import MANIFEST, ArtifactError

    default_run = settings.learner.output_dir or settings.data_dir / "learner" / "pretrain"
    root = base
    if root is None and (default_run / "model" / MANIFEST).is_file():
        root = default_run
    model = None
    if root is not None:
        if (root / MANIFEST).is_file():
            model = root
        elif (root / "model" / MANIFEST).is_file():
            model = root / "model"
        elif root.is_dir():
            raise ArtifactError(f"--base {root}: neither a model artifact (no {MANIFEST}) nor a pre-training run "
                                "(no model/); give the directory `osmf learner pretrain` wrote")
        else:
            raise ArtifactError(f"--base {root}: no such directory; give a pre-training run or a model artifact")
    if traffic is None and model is not None:
        for candidate in (model.parent / "traffic", model / "traffic"):
            if (candidate / "log.json").is_file():
                traffic = candidate
                break
    if traffic is None and (default_run / "traffic" / "log.json").is_file():
        traffic = default_run / "traffic"
    return model, traffic


def _incumbent(repo: Path, name: str, base_model: Path | None, echo: Callable[[str], None]) -> tuple[Any, int]:
    """The latest published version, loaded; the base model is published as version 1 first when there is none."""
    from learner.model.artifact import ArtifactError, verify_artifact
    from learner.model.gmllm import GMLLM
    from learner.publish import latest_version, publish_version

    version = latest_version(repo, name)
    if version is not None:
        gmllm = GMLLM.load(repo / name / str(version))
        note = f" (the base {base_model} is not republished; it only supplies the catalogue)" if base_model else ""
        echo(f"incumbent: version {version} of {repo / name}{note}")
        return gmllm, version
    if base_model is None:
        raise ArtifactError(f"no published version in {repo / name} and no base model to publish as version 1")
    gmllm = GMLLM.load(base_model)
    published = publish_version(base_model, repo, name, verify=verify_artifact,
                                metadata={"round": 0, "initial": True, "source": str(base_model)})
    echo(f"incumbent: version {published.version} of {repo / name}, published from {base_model}")
    return gmllm, published.version


def _traffic_members(world: Any, traffic: Any) -> dict[str, Any]:
    """Per group of the traffic log, how many of its users sit in each hidden segment of ``world``."""
    from collections import Counter

    users = {user.id: user for user in world.users}
    members: dict[str, Counter] = {}
    seen: set[tuple[str, str]] = set()
    for record in traffic.records:
        key = (record.group_id, record.user_id)
        if key in seen or record.user_id not in users or record.category not in world.categories:
            continue
        seen.add(key)
        segment = world.segment_of(users[record.user_id], record.category)
        members.setdefault(record.group_id, Counter())[segment.key] += 1
    return members


def _world_judge(settings: Any, learner: Any, path: Path, traffic: Any, features_for: Any,
                 echo: Callable[[str], None]) -> Any:
    """``judge_for(features)`` of the loop: a :class:`infra.world.judge.WorldCTR` over the world's groups."""
    from infra.cli import _load_world
    from infra.world.judge import WorldCTR

    world = _load_world(path)
    members = None
    if settings.features.enabled:
        from features.store import is_applied

        if is_applied(settings):  # members of the live groups, through the store's user -> group view
            from features.read import FeatureReader
            from infra.world.judge import store_group_members

            members = store_group_members(world, FeatureReader(settings)) or None
    source = "the feature store"
    if members is None:
        members, source = _traffic_members(world, traffic), "the base run's traffic log"
    if not members:
        typer.echo(f"error: --world {path}: none of the traffic log's users live in this world; give the world the "
                   "base run was simulated from", err=True)
        raise typer.Exit(2)
    echo(f"simulated CTR: world {world.name}, {len(members)} groups (members from {source})")
    products = traffic.products

    def judge_for(features: Any) -> Any:
        judged = {**features_for(sorted(members)), **features}
        return WorldCTR(world, members, judged, products, learner.generation, learner.loop.ctr_products_per_group)

    return judge_for


MALFORMED_SHOWN = 10
"""Malformed pair messages printed (with the reason) per run; the summary counts them all."""


def _run_learner(settings: Any, learner: Any, bootstrap: str, repo: Path, log_file: Path, *, base: Path | None,
                 traffic: Path | None, world: Path | None, once: bool, one_size: bool, max_rounds: int | None,
                 idle_exit_s: float | None) -> int:
    """The loop behind ``osmf learner run``; returns the exit status."""
    import signal

    from rich.console import Console

    from learner.data import TrafficError, TrafficLog
    from learner.group_features import read_group_features
    from learner.loop import NEW, LearnerLoop, group_feature_source
    from learner.publish import latest_version
    from streams.events import EventError
    from streams.kafka import TopicFollower, consume_all, produce_raw
    from streams.messages import DeadLetter, parse_dead_letter, parse_pair, to_bytes

    status = Console(stderr=True)

    def echo(text: str) -> None:
        typer.echo(f"learner: {text}")

    base_model, traffic_dir = _base_paths(settings, base, traffic)
    name = learner.loop.model_name
    if base_model is None and latest_version(repo, name) is None:
        typer.echo(f"error: no published version in {repo / name} and no --base; give --base with a pre-training run "
                   "(`osmf learner pretrain` writes one) or a model artifact to start from", err=True)
        return 2
    if traffic_dir is None:
        typer.echo("error: no product catalogue; give --traffic with a traffic log directory "
                   "(e.g. the traffic/ of `osmf learner pretrain`) or --base with a pre-training run", err=True)
        return 2
    try:
        traffic_log = TrafficLog.load(traffic_dir)
    except TrafficError as exc:
        typer.echo(f"error: --traffic: {exc}", err=True)
        return 2
    incumbent, version = _incumbent(repo, name, base_model, echo)
    fallback = read_group_features(traffic_log)
    features_for, feature_source = group_feature_source(settings, fallback)
    echo(f"catalogue: {len(traffic_log.products)} products from {traffic_dir}; group features: {feature_source} "
         f"({len(fallback)} groups in the traffic log)" + ("; one-size baseline" if one_size else ""))
    judge = _world_judge(settings, learner, world, traffic_log, features_for, echo) if world else None
    loop = LearnerLoop(incumbent, version, traffic_log.products, features_for, learner, repo, log_file,
                       judge=judge, one_size=one_size)
    if loop.next_round > 1:
        echo(f"history: {loop.next_round - 1} rounds logged in {log_file}; this run starts at round {loop.next_round}")

    topic, dead_topic = settings.topics.preference_pairs, settings.topics.dead_letter
    already_dead = {
        (letter.partition, letter.offset)
        for letter in (_letter_or_none(parse_dead_letter, r.value) for r in consume_all(bootstrap, [dead_topic]))
        if letter is not None and letter.source_topic == topic
    }
    malformed = {"count": 0, "sent": 0, "shown": 0}

    def take(records: list[Any]) -> int:
        letters, new = [], 0
        for record in records:
            try:
                pair = parse_pair(record.value)
            except EventError as exc:
                malformed["count"] += 1
                if (record.partition, record.offset) not in already_dead:
                    malformed["shown"] += 1
                    if malformed["shown"] <= MALFORMED_SHOWN:
                        status.print(f"malformed pair at {record.topic}[{record.partition}]@{record.offset}: {exc} "
                                     f"-> {dead_topic}", markup=False, highlight=False, soft_wrap=True)
                    letter = DeadLetter.from_error(exc, record.value, source_topic=record.topic,
                                                   partition=record.partition, offset=record.offset,
                                                   ts=int(time.time() * 1000))
                    letters.append((record.key, to_bytes(letter)))
                continue
            new += loop.offer(pair) == NEW
        if letters:
            malformed["sent"] += produce_raw(bootstrap, dead_topic, letters)
        return new

    stop = {"requested": False, "in_round": False}

    def on_signal(signum: int, _frame: Any) -> None:
        if stop["requested"] and stop["in_round"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        if stop["in_round"]:
            status.print("stopping after the round in progress (Ctrl-C again aborts it; an aborted round "
                         "publishes nothing)", soft_wrap=True)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread (e.g. embedded in another program): no handlers
            pass

    def one_round() -> None:
        stop["in_round"] = True
        with status.status(f"round {loop.next_round}: training on {len(loop.buffer)} pairs") as spinner:
            def on_log(step: int, figures: dict[str, float]) -> None:
                spinner.update(f"round {loop.next_round}: step {step}, loss {figures.get('loss', float('nan')):.3f}")

            summary = loop.train_round(on_log=on_log)
        stop["in_round"] = False
        left = f"; {summary.unknown_group_pairs} pairs of groups without features left out" \
            if summary.unknown_group_pairs else ""
        typer.echo(f"round {summary.number}: {summary.train_pairs} train + {summary.heldout_pairs} held-out pairs "
                   f"in {summary.groups} groups, {summary.steps} steps, {summary.seconds:.1f} s -> "
                   f"{summary.decision}; live version {loop.version}{left}")

    code = 0
    echo(f"reading {topic} from the beginning at {bootstrap}")
    try:
        with TopicFollower(bootstrap, [topic]) as follower:
            replaying, idle_since = True, time.monotonic()
            with status.status("reading the pairs topic") as spinner:
                while not stop["requested"]:
                    if take(follower.poll(timeout_s=0.5)):
                        idle_since = time.monotonic()
                    if replaying:
                        if not follower.caught_up:
                            continue
                        replaying = False
                        still_new = loop.replayed()
                        c = loop.counts
                        echo(f"read {c.offered} pairs from {topic} ({c.duplicates} duplicates, {malformed['count']} "
                             f"malformed, {c.unknown_product} of unknown products); {len(loop.buffer)} in the "
                             f"buffer, {still_new} new since the last round")
                        if once:
                            break
                    now = time.monotonic()
                    if loop.due(now):
                        spinner.stop()
                        one_round()
                        spinner.start()
                        idle_since = time.monotonic()
                        if max_rounds is not None and len(loop.rounds) >= max_rounds:
                            break
                    elif idle_exit_s is not None and now - idle_since >= idle_exit_s:
                        echo(f"no new pair for {idle_exit_s:g} s; exiting")
                        break
                    spinner.update(f"waiting: {loop.buffer.new_pairs}/{loop.trigger.min_new_pairs} new pairs, "
                                   f"or one and {loop.seconds_to_wait(now):.0f} s")
        if once and not stop["requested"] and loop.buffer.new_pairs > 0:
            one_round()
        elif once and not stop["requested"]:
            echo("no new pairs; no round run")
    except KeyboardInterrupt:
        stop["in_round"] = False
        typer.echo(f"round {loop.next_round} aborted: nothing was published; live version {loop.version}", err=True)
        code = 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _print_run_summary(loop, malformed, topic, dead_topic)
    return code


def _letter_or_none(parse: Callable[[bytes], Any], value: bytes) -> Any:
    from streams.events import EventError

    try:
        return parse(value)
    except EventError:
        return None


def _print_run_summary(loop: Any, malformed: dict[str, int], topic: str, dead_topic: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    if loop.rounds:
        table = Table(title=f"learner rounds (live version {loop.version})")
        for column in ("round", "train pairs", "held-out", "groups", "steps", "seconds", "decision", "version"):
            table.add_column(column, justify="left" if column == "decision" else "right")
        for r in loop.rounds:
            table.add_row(str(r.number), str(r.train_pairs), str(r.heldout_pairs), str(r.groups), str(r.steps),
                          f"{r.seconds:.1f}", r.decision, str(r.version))
        console.print(table)
    c = loop.counts
    lines = [f"pairs read from {topic}: {c.offered} ({c.new} kept as new, {c.duplicates} duplicates)",
             f"malformed messages: {malformed['count']} ({malformed['sent']} sent to {dead_topic}, "
             f"{malformed['count'] - malformed['sent']} already there)"]
    if c.unknown_product:
        shown = ", ".join(f"{p} ({n})" for p, n in c.unknown_product_ids.most_common(5))
        lines.append(f"skipped, product not in the catalogue: {c.unknown_product} ({shown})")
    if c.unknown_group:
        shown = ", ".join(f"{g} ({n})" for g, n in c.unknown_group_ids.most_common(5))
        lines.append(f"left out of the last round, group without features: {c.unknown_group} ({shown})")
    lines.append(f"rounds run: {len(loop.rounds)}; live version {loop.version}; history: {loop.history}")
    for line in lines:
        typer.echo(line)


def _use_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def _settings_or_exit() -> Any:
    from infra.cli import _settings

    return _settings()
