"""``osmf experiment``: the online experiment (logic in :mod:`sim.experiment`): parse, call, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import friendly_errors, load_settings, load_world


@friendly_errors
def experiment_command(
    world: Annotated[Path, typer.Option("--world", help="World YAML (see docs/world.md).")],
    arms: Annotated[str, typer.Option("--arms", help="Comma list of arms: base, one-size, group-dpo.")] =
        "base,one-size,group-dpo",
    minutes: Annotated[float, typer.Option("--minutes", help="Simulated minutes of traffic.")] = 6.0,
    seed: Annotated[int, typer.Option("--seed", help="Seeds traffic, clicks, sampling and fits.")] = 0,
    rate: Annotated[float, typer.Option("--rate", help="Impressions per simulated second.")] = 300.0,
    round_every: Annotated[float, typer.Option("--round-every", help="Simulated minutes between rounds.")] = 1.5,
    min_impressions: Annotated[int, typer.Option("--min-impressions",
                                                 help="Impressions a creative needs before it can form a pair.")] = 60,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller pre-training and fits (tests).")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder; default "
                                             "<data_dir>/experiments/<world>-<seed>/.")] = None,
) -> None:
    """Split one simulated traffic stream across arms by user hash; each arm serves, learns and is judged."""
    from rich.console import Console
    from rich.table import Table

    from sim.experiment import ExperimentError, ExperimentOptions, parse_arms, run_experiment, write_report

    try:
        arm_list = parse_arms(arms)
    except ExperimentError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if minutes <= 0 or rate <= 0 or round_every <= 0 or min_impressions < 1:
        typer.echo("error: --minutes, --rate, --round-every must be positive and --min-impressions at least 1",
                   err=True)
        raise typer.Exit(2)
    loaded = load_world(world)
    settings = load_settings()
    console = Console(stderr=True)
    options = ExperimentOptions(world_file=world, arms=arm_list, minutes=minutes, seed=seed, rate=rate,
                                round_every_min=round_every, min_impressions=min_impressions, quick=quick,
                                cache_dir=settings.data_dir / "experiments" / "bases",
                                learner={"loop": {"promotion": settings.learner.loop.promotion}})
    report = run_experiment(options, echo=lambda m: console.print(m, highlight=False))
    folder = out or settings.data_dir / "experiments" / f"{loaded.name}-{seed}"
    paths = write_report(report, folder)

    table = Table(title=f"experiment on {report['world']} (seed {seed}, {minutes:g} simulated min at {rate:g}/s)")
    table.add_column("group")
    for name in report["arms"]:
        table.add_column(name)
    table.add_column("oracle (expected)")
    results = report["results"]

    def cell(v: dict) -> str:
        return f"{v['ctr']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] n={v['impressions']}" \
            if v.get("ctr") is not None else "-"

    for g in report["groups"]:
        o = report["oracle_ctr"].get(g)
        table.add_row(g, *(cell(results[a]["per_group"][g]) for a in report["arms"]),
                      f"{o:.4f}" if o is not None else "-")
    table.add_row("all", *(cell(results[a]) for a in report["arms"]), "")
    table.add_row("worst group", *(f"{results[a]['worst_group']}: " + cell({"ctr": results[a]["worst_ctr"],
                                   "ci95": results[a]["worst_ci95"], "impressions": results[a]["per_group"]
                                   [results[a]["worst_group"]]["impressions"]}) if results[a]["worst_group"]
                                   else "-" for a in report["arms"]), "")
    table.add_row("versions served", *(" → ".join(v["version"] for v in results[a]["versions"])
                                       for a in report["arms"]), "")
    table.add_row("rounds / promoted", *(f"{len(results[a]['rounds'])} / {results[a]['promoted']}"
                                         for a in report["arms"]), "")
    table.add_row("evidence → live (sim s)", *(", ".join(f"{s:g}" for s in results[a]["evidence_to_live_s"]) or "-"
                                               for a in report["arms"]), "")
    table.add_row("drift alerts", *(", ".join(f"{x['group']}@{x['ts_s']:.0f}s" for x in results[a]["drift_alerts"])
                                    or "-" for a in report["arms"]), "")
    if report["shifts"]:
        table.add_row("changed after 1st alert", *(str(results[a]["targets_changed_after_first_alert"])
                                                   for a in report["arms"]), "")
    console.width = max(console.width, 160)
    console.print(table)
    console.print(f"users in several arms: {report['users_in_several_arms']}; "
                  f"world shifts: {report['shifts'] or 'none'}; {report['seconds']['total']:.0f} s wall")
    for path in paths:
        typer.echo(str(path))
