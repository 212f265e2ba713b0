"""``osmf serve``: Triton Inference Server hosting the published G-MLLM versions (docs/serving.md).

Mounted on the ``osmf`` command by ``app.add_typer(serve_app, name="serve")``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import friendly_errors, load_settings

serve_app = typer.Typer(
    help="Serve creatives on Triton: start/stop the server, list versions, roll back (docs/serving.md).",
    no_args_is_help=True,
)


@serve_app.command("start")
@friendly_errors
def start_command(
    watch: Annotated[bool, typer.Option(help="Also run the watcher that makes new versions live.")] = True,
) -> None:
    """Start tritonserver on 127.0.0.1, load render, the kept gmllm versions and creative; make the newest live."""
    from serving import server
    from serving.live import VersionManager
    from serving.watch import start_watcher

    settings = load_settings()
    pid = server.start_server(settings)
    try:
        state = VersionManager(settings, echo=typer.echo).start()
    except server.ServingError:
        server.stop_server(settings)
        raise
    s = settings.serving
    typer.echo(f"tritonserver pid {pid}: http {s.host}:{s.http_port}, grpc {s.host}:{s.grpc_port}, "
               f"metrics http://{s.host}:{s.metrics_port}/metrics; log {server.log_file(settings)}")
    typer.echo(f"live version: {state.live if state.live is not None else 'none (no good version published yet)'}")
    if watch:
        typer.echo(f"watcher pid {start_watcher(settings)} (new versions go live after their smoke test)")


@serve_app.command("stop")
@friendly_errors
def stop_command() -> None:
    """Stop the watcher and tritonserver (with its backend stubs) by pid."""
    from serving import server
    from serving.watch import stop_watcher

    settings = load_settings()
    watcher = stop_watcher(settings)
    pid = server.stop_server(settings)
    typer.echo(("tritonserver stopped" if pid else "tritonserver was not running")
               + (f"; watcher {watcher} stopped" if watcher else ""))


@serve_app.command("status")
@friendly_errors
def status_command() -> None:
    """Say whether tritonserver runs and is ready, which models are loaded and which version is live; exit 1 if not running."""
    from serving import server
    from serving.live import read_state

    settings = load_settings()
    status = server.status(settings)
    if not status.running:
        typer.echo(f"not running (log: {server.log_file(settings)})")
        raise typer.Exit(1)
    state = read_state(settings)
    typer.echo(f"tritonserver pid {status.pid}: {'ready' if status.ready else 'live, not ready'}; "
               f"live version {state.live}, previous {state.previous}")
    if state.groups:  # per-group promotion: these groups are served by another version than the live one
        routed = ", ".join(f"{group} -> v{version}" for group, version in sorted(state.groups.items()))
        typer.echo(f"  routed groups ({len(state.groups)}): {routed}")
    for model in status.models:
        typer.echo(f"  {model.get('name')} v{model.get('version', '-')}: {model.get('state', 'UNAVAILABLE')}"
                   + (f" ({model['reason']})" if model.get("reason") else ""))


@serve_app.command("rollback")
@friendly_errors
def rollback_command() -> None:
    """Make the previous good version live again (a switch: it is still loaded)."""
    from serving.live import VersionManager

    outcome = VersionManager(load_settings()).rollback()
    typer.echo(f"version {outcome.version} is live ({outcome.reason}) in {outcome.seconds:.2f}s")


@serve_app.command("versions")
@friendly_errors
def versions_command() -> None:
    """Every published version: its serving state (live, previous, refused with the reason, ...) and gate figures."""
    from serving.live import versions_table

    rows = versions_table(load_settings())
    if not rows:
        typer.echo("no version published yet")
        return
    for row in rows:
        gate = row["gate"]
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in gate.items()
                            if not isinstance(v, (dict, list)))
        line = f"{row['version']:>4}  {row['state']:<18} {row['decision'] or '-'}"
        if figures:
            line += f"  gate: {figures}"
        if row["reason"]:
            line += f"  reason: {row['reason']}"
        typer.echo(line)
