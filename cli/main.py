"""The ``osmf`` command: one entry point for every job of the product.

Heavy libraries are imported inside each command so ``osmf --help`` stays instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import friendly_errors, load_settings, load_world, ready_bootstrap
from cli.dashboard.command import dashboard_command
from cli.experiment import experiment_command
from cli.export import export_app
from cli.features import features_app
from cli.learner import learner_app
from cli.serve import serve_app

app = typer.Typer(
    help="OSMF: learn which ad creative each user group prefers, online, and generate it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
broker_app = typer.Typer(help="Run the embedded Kafka-compatible broker (Tansu).", no_args_is_help=True)
world_app = typer.Typer(help="Inspect a simulated world.", no_args_is_help=True)
replay_app = typer.Typer(help="Replay public ad logs into the impression and click topics.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
app.add_typer(world_app, name="world")
app.add_typer(replay_app, name="replay")
app.add_typer(learner_app, name="learner")
app.add_typer(features_app, name="features")
app.add_typer(serve_app, name="serve")
app.add_typer(export_app, name="export")
app.command("dashboard")(dashboard_command)
app.command("experiment")(experiment_command)

@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML settings file (same as OSMF_CONFIG). Environment variables OSMF_* override it.",
            show_default=False,
        ),
    ] = None,
) -> None:
    if config is not None:
        if not config.is_file():
            typer.echo(f"error: --config {config}: no such file; give the path of a YAML settings file", err=True)
            raise typer.Exit(2)
        os.environ["OSMF_CONFIG"] = str(config)


# --------------------------------------------------------------------- broker


@broker_app.command("start")
@friendly_errors
def broker_start() -> None:
    """Start Tansu on 127.0.0.1 (memory or durable S3 storage), wait until it answers, create the topics."""
    from infra.broker import start_broker
    from infra.kafka import ensure_topics

    settings = load_settings()
    status = start_broker(settings)
    created = ensure_topics(status.bootstrap, settings.topics.all_names(), settings.topics.partitions)
    where = "external cluster" if status.external else f"Tansu pid {status.pid}, storage {status.storage}"
    typer.echo(f"broker ready at {status.bootstrap} ({where})" + (f"; {status.note}" if status.note else ""))
    if created:
        typer.echo(f"created topics: {', '.join(created)} ({settings.topics.partitions} partitions each)")


@broker_app.command("stop")
@friendly_errors
def broker_stop() -> None:
    """Stop the embedded broker (and its local S3 server, if any)."""
    from infra.broker import stop_broker

    stopped = stop_broker(load_settings())
    typer.echo("broker stopped" if stopped else "broker was not running")


@broker_app.command("status")
@friendly_errors
def broker_status() -> None:
    """Say whether the broker runs and answers; exit 1 when it does not."""
    from infra.broker import broker_status as read_status

    status = read_status(load_settings())
    if status.running:
        kind = "external cluster" if status.external else f"Tansu pid {status.pid}, storage {status.storage}"
        typer.echo(f"running at {status.bootstrap} ({kind})")
        return
    note = f"; {status.note}" if status.note else ""
    typer.echo(f"not running (expected at {status.bootstrap}; log: {status.log_file}){note}")
    raise typer.Exit(1)


# --------------------------------------------------------------------- replay


@replay_app.command("taobao")
@friendly_errors
def replay_taobao(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Taobao CSVs: joined samples (clk,time_stamp,userid,...) or the three raw files "
            "raw_sample.csv, user_profile.csv, ad_feature.csv (told apart by their headers).",
            show_default=False,
        ),
    ],
    speedup: Annotated[
        float,
        typer.Option(help="Replay speed relative to the logged time; 0 = as fast as possible.", min=0.0),
    ] = 0.0,
    click_delay_ms: Annotated[
        int, typer.Option(help="Time between an impression and its click (the logs have none).", min=1)
    ] = 1000,
) -> None:
    """Turn Taobao display-ad logs into impressions and clicks on the Kafka topics."""
    from infra.producer import produce
    from sim.replay import paced, read_taobao

    settings = load_settings()
    bootstrap = ready_bootstrap(settings)
    events, report = read_taobao(files, click_delay_ms=click_delay_ms)
    sent = produce(bootstrap, paced(events, speedup), settings.topics, settings.producer)
    typer.echo(
        f"replayed {report.rows_read} rows: {report.impressions} impressions, {report.clicks} clicks "
        f"({sent} events sent to {bootstrap}); {report.missing_profiles} users without profile"
    )
    for bad in report.bad_rows[:20]:
        typer.echo(f"bad row {bad.file}:{bad.line}: {bad.reason}", err=True)
    if report.bad_rows:
        more = " (first 20 shown)" if len(report.bad_rows) > 20 else ""
        typer.echo(f"{len(report.bad_rows)} bad rows were not replayed{more}", err=True)


# --------------------------------------------------------------------- worker


@app.command("worker")
@friendly_errors
def worker(
    workers: Annotated[
        int | None,
        typer.Option("-n", "--workers", help="Worker processes in one consumer group (default: settings).", min=1),
    ] = None,
    index: Annotated[int, typer.Option(help="This worker's number (set by -n; picks its metrics port).", min=1)] = 1,
    loglevel: Annotated[str, typer.Option(help="Faust log level: debug, info, warning, error.")] = "warning",
) -> None:
    """Run the stream worker: validate, dedupe, group, count CTR, mine preference pairs, detect drift."""
    from streams.worker import run_worker, spawn_workers

    settings = load_settings()
    count = workers or settings.streams.workers
    if count > 1:
        raise typer.Exit(spawn_workers(count, ["--loglevel", loglevel]))
    run_worker(settings, index=index, loglevel=loglevel)


# -------------------------------------------------------------- world, simulate

WorldOption = Annotated[
    Path | None,
    typer.Option(
        "--world", "-w", help="World YAML (schema: docs/world.md); default: settings, else example world A."
    ),
]


@world_app.command("oracle")
@friendly_errors
def world_oracle(
    world: WorldOption = None,
    prompts: Annotated[int, typer.Option(help="Random prompts sampled as the search space.", min=1)] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the prompt sample.")] = 0,
) -> None:
    """Print, per category and hidden segment, the best CTR reachable among many prompts."""
    from rich.console import Console
    from rich.table import Table

    from sim.oracle import oracle_table
    from sim.simulate import world_path

    settings = load_settings()
    loaded = load_world(world_path(settings, world))
    table = Table(title=f"oracle CTR, {prompts} sampled prompts")
    for column in ("category", "segment", "share", "best", "mean", "worst", "one-size", "best prompt"):
        table.add_column(column)
    for row in oracle_table(loaded, n_prompts=prompts, seed=seed):
        table.add_row(
            row.category, row.segment, f"{row.share:.2f}", f"{row.best_ctr:.4f}", f"{row.mean_ctr:.4f}",
            f"{row.worst_ctr:.4f}", f"{row.one_size_ctr:.4f}", row.best_prompt.to_text(),
        )
    Console(width=200).print(table)


@app.command("simulate")
@friendly_errors
def simulate(
    world: WorldOption = None,
    rate: Annotated[float | None, typer.Option(help="Impressions per second (default: settings).", min=0.001)] = None,
    duration: Annotated[
        float | None, typer.Option(help="Seconds of traffic to play (default: settings).", min=0.001)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed and start time, same events.")] = None,
    start_ts: Annotated[
        int | None,
        typer.Option(help="Epoch ms of the first impression; default: now. Fix it to reproduce a stream exactly."),
    ] = None,
    serve: Annotated[
        bool,
        typer.Option("--serve", help="Ask the creative client (Triton, `osmf serve start`) for every impression "
                     "instead of showing random creatives; impressions carry the model version, group and creative "
                     "id served, and clicks follow from the served pixels."),
    ] = False,
) -> None:
    """Play the ad system: show creatives of the world's products and send impressions and clicks to Kafka."""
    from rich.progress import Progress

    from infra.producer import produce
    from sim.replay import paced
    from sim.simulate import counted, simulated_events, time_ordered, world_path

    settings = load_settings()
    loaded = load_world(world_path(settings, world))
    bootstrap = ready_bootstrap(settings)
    rate = rate or settings.simulator.rate
    duration = duration or settings.simulator.duration_s
    seed = settings.simulator.seed if seed is None else seed
    chooser, client = None, None
    if serve:
        from serving.client import CreativeClient
        from sim.adsystem import ServedChooser, catalogue, served_share

        client = CreativeClient(settings, catalogue(loaded), seed=seed)
        if client.live_version is None:
            client.close()
            typer.echo("error: --serve: no live model version; start serving with `osmf serve start` after the "
                       "learner has published one", err=True)
            raise typer.Exit(2)
        chooser = ServedChooser(loaded, client)
    events = simulated_events(loaded, settings, seed=seed, rate=rate, duration_s=duration, start_ts_ms=start_ts,
                              chooser=chooser)
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("simulating", total=None)
            live = paced(time_ordered(events), speedup=1.0)
            sent = produce(bootstrap, counted(live, lambda: progress.advance(task)), settings.topics,
                           settings.producer)
    finally:
        if client is not None:
            client.close()
    typer.echo(f"sent {sent} events ({rate:g} impressions/s for {duration:g} s) to {bootstrap}")
    if chooser is not None:
        shares = ", ".join(f"v{v} {s:.0%}" for v, s in served_share(chooser.counts).items())
        typer.echo(f"served: {shares}; {chooser.counts.explored:,} explored, {chooser.counts.fallbacks:,} fallbacks")


@app.command("demo")
@friendly_errors
def demo(
    world: WorldOption = None,
    minutes: Annotated[
        float, typer.Option(help="Minutes of simulated ad traffic in the closed loop (after start-up and the base "
                            "model's pre-training, about 2 minutes the first time).", min=0.5)
    ] = 8.0,
    rate: Annotated[float, typer.Option(help="Impressions per second the simulated ad system requests.", min=1.0)] = 150.0,
    seed: Annotated[int, typer.Option(help="Seed of the simulated traffic and of the client's exploration.")] = 0,
    loop: Annotated[
        bool, typer.Option("--loop/--traffic-only", help="The whole closed loop (default), or only broker, worker "
                           "and --duration seconds of random creatives with the CTR tables.")
    ] = True,
    duration: Annotated[float, typer.Option(help="--traffic-only: seconds of simulated traffic.", min=1.0)] = 20.0,
) -> None:
    """Run the embedded system end to end: broker, stream worker, Feast, learner, Triton and the simulated ad system.

    The simulated ad system asks the serving client for every impression; the
    learner trains Group-DPO rounds on the pairs the worker mines from them and
    every promoted version goes live on Triton. A live display shows events/s,
    groups, pairs, rounds, the live version and CTR per group; at the end a
    summary table gives CTR per group per served version. Ctrl-C stops
    everything the demo started.
    """
    from sim.simulate import world_path

    settings = load_settings()
    path = world_path(settings, world)
    if not loop:
        from cli.demo import run_demo

        raise typer.Exit(run_demo(settings, load_world(path), path.name, duration, rate, with_worker=True))
    from cli.demo_loop import run_loop_demo

    raise typer.Exit(run_loop_demo(settings, load_world(path), path, minutes, rate, seed))


# ---------------------------------------------------------------------- bench

BENCHMARKS: dict[str, str] = {
    "streams": "bench.streams", "grouping": "bench.grouping", "freshness": "bench.freshness",
    "feature-read": "bench.feature_read", "pretrain": "bench.pretrain", "alignment": "bench.alignment",
    "gate-estimate": "bench.gate_estimate", "group-dpo": "bench.group_dpo", "serving": "bench.serving",
    "loop": "bench.loop",
}
"""Benchmark name -> module under ``bench/`` exposing ``run(BenchOptions) -> dict``."""


@app.command("bench")
@friendly_errors
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark to run; `osmf bench list` shows them.", show_default=False)],
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes; finishes in under a minute.")] = False,
    world: Annotated[
        Path | None, typer.Option(help="World YAML for benchmarks that simulate (default: their example world).")
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="alignment: repeats; figures are mean ± sd over them (default 1).")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(min=0, help="alignment: on-policy rounds (default 1).")
    ] = None,
    gate: Annotated[
        bool, typer.Option("--gate/--no-gate", help="alignment: refuse candidates that lower a group's CTR.")
    ] = True,
    rerank: Annotated[
        str | None, typer.Option(help="alignment: whose click head picks the served creative: live (each model's "
                                      "own) or base (the frozen pre-trained base).")
    ] = None,
    serve: Annotated[
        str | None, typer.Option(help="alignment: what a group is served and judged by: slate (the mean of the "
                                      "sampled slate, what the creative client's Thompson sampling starts from) or "
                                      "rerank (the creative the click answer picks of the samples); default "
                                      "learner.loop.ctr_served (slate).")
    ] = None,
    impressions: Annotated[
        int | None, typer.Option(min=1_000, help="streams: impressions simulated (their clicks come on top; default "
                                           "60,000, --quick 5,000). A full run reads them in ~2 s a path; more "
                                           "measures the steady state, e.g. -n 2's scale-out (docs/streams.md).")
    ] = None,
    baselines: Annotated[
        str | None, typer.Option(help="alignment: comma-separated baselines run as more arms beside Group-DPO, "
                                      "with the same slates, rounds, gate and judge: kto (TRL's KTO on single "
                                      "clicked / not-clicked impressions), rloo (TRL's RLOO rewarded by the live "
                                      "model's click head, calibrated per group). Default: none.")
    ] = None,
) -> None:
    """Run a benchmark; it prints a summary table and ends with one JSON line of figures."""
    import importlib

    from bench.common import BenchOptions, emit_result

    if name == "list":
        for bench_name, module in sorted(BENCHMARKS.items()):
            doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()
            typer.echo(f"{bench_name:12s} {doc[0] if doc else ''}")
        return
    if name not in BENCHMARKS:
        typer.echo(f"error: unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHMARKS))}", err=True)
        raise typer.Exit(2)
    if world is not None and not world.is_file():
        typer.echo(f"error: --world {world}: no such file; give a world YAML (see docs/world.md)", err=True)
        raise typer.Exit(2)
    chosen: tuple[str, ...] = ()
    if name == "alignment" and baselines is not None:
        from bench.alignment import check_baselines

        try:
            chosen = check_baselines(baselines)
        except ValueError as error:
            typer.echo(f"error: --{error}", err=True)
            raise typer.Exit(2) from None
    settings = load_settings()
    options = BenchOptions(quick=quick, world=world, output_dir=settings.data_dir / "bench")
    if name == "alignment":
        from bench.alignment import AlignmentOptions

        if rerank not in (None, "live", "base"):
            typer.echo(f"error: --rerank {rerank}: choose live or base", err=True)
            raise typer.Exit(2)
        if serve not in (None, "rerank", "slate"):
            typer.echo(f"error: --serve {serve}: choose rerank or slate", err=True)
            raise typer.Exit(2)
        options = AlignmentOptions(quick=quick, world=world, output_dir=options.output_dir, seeds=seeds or 1,
                                   rounds=1 if rounds is None else rounds, gate=gate, rerank=rerank or "live",
                                   serve=serve, baselines=chosen)
    elif (seeds is not None or rounds is not None or not gate or rerank is not None or serve is not None
          or baselines is not None):
        typer.echo(f"error: --seeds, --rounds, --no-gate, --rerank, --serve and --baselines are options of "
                   f"`osmf bench alignment`, not {name!r}", err=True)
        raise typer.Exit(2)
    if name == "streams":
        from bench.streams import StreamsOptions

        options = StreamsOptions(quick=quick, world=world, output_dir=options.output_dir, impressions=impressions)
    elif impressions is not None:
        typer.echo(f"error: --impressions is an option of `osmf bench streams`, not {name!r}", err=True)
        raise typer.Exit(2)
    figures = importlib.import_module(BENCHMARKS[name]).run(options)
    emit_result(name, figures)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
