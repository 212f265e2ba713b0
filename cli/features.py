"""``osmf features``: apply, inspect and materialize the Feast feature store.

Mounted on the ``osmf`` command by ``app.add_typer(features_app, name="features")``.
Feast is imported inside each command, so ``osmf --help`` stays instant.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

import typer

from cli.common import friendly_errors, load_settings

features_app = typer.Typer(
    help="The Feast feature store: group, user and product features (docs/features.md).", no_args_is_help=True
)

@features_app.command("apply")
@friendly_errors
def apply_command() -> None:
    """Write feature_store.yaml from the settings, register the definitions, create the online tables."""
    from features.store import apply, online_reachable

    settings = load_settings()
    if settings.features.online_store == "redis":
        reachable, note = online_reachable(settings)
        if not reachable:
            typer.echo(f"error: {note}", err=True)
            raise typer.Exit(2)
    report = apply(settings)
    typer.echo(f"applied project {settings.features.project!r} ({report.online_store} online store)")
    typer.echo(f"  entities:      {', '.join(report.entities)}")
    typer.echo(f"  feature views: {', '.join(report.feature_views)}")
    typer.echo(f"  push sources:  {', '.join(report.push_sources)}")
    typer.echo(f"  config:        {report.yaml_path}")


@features_app.command("status")
@friendly_errors
def status_command() -> None:
    """Say whether the store is applied and reachable, and how much history each view holds; exit 1 if not ready."""
    from features.store import status

    settings = load_settings()
    report = status(settings)
    typer.echo(f"store:   {report.repo_path} (project {settings.features.project!r})")
    typer.echo(f"applied: {'yes' if report.applied else 'no (run `osmf features apply`)'}")
    typer.echo(f"online:  {report.online_note}")
    for view in report.views:
        newest = view.newest_event.isoformat() if view.newest_event else "-"
        typer.echo(f"  {view.name:28s} history {view.history_rows:>9d} rows in {view.history_parts:>4d} files, "
                   f"newest event {newest}")
    if not (report.applied and report.online_reachable):
        raise typer.Exit(1)


@features_app.command("materialize")
@friendly_errors
def materialize_command(
    start: Annotated[
        datetime | None,
        typer.Option(help="Earliest event time to load (UTC); default: since the last materialize."),
    ] = None,
    end: Annotated[datetime | None, typer.Option(help="Latest event time to load (UTC); default: now.")] = None,
) -> None:
    """Load the parquet history into the online store (e.g. to refill an emptied Redis)."""
    from features.store import materialize

    def utc(value: datetime | None) -> datetime | None:
        return None if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)

    start, end = utc(start), utc(end)
    if start is not None and end is not None and end <= start:
        typer.echo(f"error: --end {end.isoformat()} must be after --start {start.isoformat()}", err=True)
        raise typer.Exit(2)
    done = materialize(load_settings(), start, end)
    typer.echo(f"materialized the history up to {done.isoformat()} into the online store")
