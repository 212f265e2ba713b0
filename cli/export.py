"""``osmf export``: write what the system learned from, for offline study (the logic: ``learner/export.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import friendly_errors, load_settings, ready_bootstrap

export_app = typer.Typer(help="Export data the system learned from, as files for offline study.", no_args_is_help=True)


@export_app.command("pairs")
@friendly_errors
def export_pairs_command(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Directory to write pairs.parquet and export.json into (created if missing).",
                     show_default=False),
    ],
    traffic: Annotated[
        Path | None,
        typer.Option(help="Traffic log directory for the product catalogue and fallback group features "
                          "(default: the traffic/ of the default pre-training run, when there is one)."),
    ] = None,
    history: Annotated[
        Path | None,
        typer.Option(help="Round log linking pairs to versions (default: <model repository>/gmllm/rounds.jsonl)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing pairs.parquet in --out.")] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds allowed to read the whole preference-pairs topic.", min=1.0)
    ] = 60.0,
) -> None:
    """Write the mined preference pairs with group features, product, prompts and evidence as a parquet dataset.

    One row per (group, product, winner, loser) at its highest evidence, as the learner's buffer keeps them.
    Load it with datasets.load_dataset("parquet", data_files="OUT/pairs.parquet"). Schema: docs/dashboard.md.
    """
    from learner.export import ExportError, export_pairs

    settings = load_settings()
    ready_bootstrap(settings)
    try:
        report = export_pairs(settings, out, traffic=traffic, history=history, overwrite=overwrite, timeout_s=timeout)
    except ExportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"wrote {report.rows} pairs of {report.groups} groups to {report.out / 'pairs.parquet'} "
        f"({report.messages} messages read, {report.malformed} malformed skipped; group features: "
        f"{report.feature_source})"
    )
    if report.without_features or report.without_product:
        typer.echo(f"note: {report.without_features} rows without group features, {report.without_product} "
                   "without a catalogue product (their columns are null); give --traffic with the base run's "
                   "traffic log", err=True)
    for example in report.malformed_examples:
        typer.echo(f"malformed: {example}", err=True)
