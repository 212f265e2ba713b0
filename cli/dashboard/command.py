"""The ``osmf dashboard`` command: parse options, start the server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import friendly_errors, load_settings


@friendly_errors
def dashboard_command(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: dashboard.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (default: dashboard.port).", min=1, max=65535)
    ] = None,
    refresh: Annotated[
        float | None, typer.Option(help="Seconds between data refreshes (default: dashboard.refresh_s).", min=0.5)
    ] = None,
    world: Annotated[
        Path | None,
        typer.Option("--world", "-w", help="World YAML whose product images the creative thumbnails use "
                     "(default: settings, else example world A)."),
    ] = None,
) -> None:
    """Serve the read-only CTR drift dashboard: CTR per group with drift alerts, versions, freshness, lag, creatives."""
    from cli.dashboard.server import run_dashboard

    settings = load_settings()
    if world is not None and not world.is_file():
        typer.echo(f"error: --world {world}: no such file; give a world YAML (see docs/world.md)", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run_dashboard(settings, host=host, port=port, refresh_s=refresh, world=world))
