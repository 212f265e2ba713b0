"""Start the dashboard: a Dash app whose one callback redraws every panel from the collector's snapshot.

The same server answers ``/metrics`` (:mod:`cli.dashboard.metrics`) for Prometheus.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path

import typer
from dash import Dash, Input, Output

from cli.dashboard.data import Collector
from cli.dashboard.layout import page, panels
from cli.dashboard.metrics import metrics_text
from infra.settings import Settings
from infra.security import http_token, require_bearer

TITLE = "OSMF - CTR drift dashboard"


def build_app(collector: Collector, refresh_s: float) -> Dash:
    """The Dash app (read-only: the page has no control that changes anything)."""
    app = Dash(__name__, title=TITLE, update_title=None, serve_locally=True)
    app.layout = page(refresh_s, TITLE)

    @app.server.route("/metrics")
    def _metrics():  # noqa: ANN202 - a Flask response
        from prometheus_client import CONTENT_TYPE_LATEST

        return metrics_text(collector), 200, {"Content-Type": CONTENT_TYPE_LATEST}

    @app.callback(
        Output("notes-box", "children"), Output("ctr-graph", "figure"), Output("versions-graph", "figure"),
        Output("versions-box", "children"), Output("freshness-box", "children"), Output("lag-graph", "figure"),
        Output("dead-letter-box", "children"), Output("creatives-box", "children"),
        Input("tick", "n_intervals"),
    )
    def _redraw(_: int):  # noqa: ANN202 - Dash reads the tuple
        return panels(collector.snapshot())

    return app


class Refresher:
    """Calls ``collector.refresh()`` every ``interval_s`` in a daemon thread until :meth:`stop`."""

    def __init__(self, collector: Collector, interval_s: float) -> None:
        self.collector, self.interval_s = collector, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="osmf-dashboard-refresh", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.collector.refresh()
            except Exception:  # noqa: BLE001 - keep refreshing; the page notes say what is missing
                logging.getLogger(__name__).exception("dashboard refresh failed")
            self._stop.wait(self.interval_s)

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Ask the thread to stop and wait up to ``timeout_s``; True when it has stopped (a refresh can take
        long on a loaded machine: Ctrl-C must not wait for it, the daemon thread ends with the process)."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM stop the server, also when the parent started it with SIGINT ignored (a
    background job of a script: Python then installs no handler of its own) or stops it as a service does."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, interrupt)


def port_free(host: str, port: int) -> bool:
    """True when ``host:port`` can be bound now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def run_dashboard(
    settings: Settings, *, host: str | None = None, port: int | None = None, refresh_s: float | None = None,
    world: Path | None = None,
) -> int:
    """Serve the dashboard until Ctrl-C; returns the exit status."""
    cfg = settings.dashboard
    host, port, refresh_s = host or cfg.host, port or cfg.port, refresh_s or cfg.refresh_s
    if not port_free(host, port):
        typer.echo(f"error: dashboard.port: port {port} on {host} is in use; pass --port or set "
                   "OSMF_DASHBOARD__PORT", err=True)
        return 2
    collector = Collector(settings, world=world)
    refresher = Refresher(collector, refresh_s).start()
    app = build_app(collector, refresh_s)
    app.server.wsgi_app = require_bearer(app.server.wsgi_app, http_token(settings.security))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    typer.echo(f"dashboard at http://{host}:{port}/ (read-only; refresh every {refresh_s:g} s; Ctrl-C stops)")
    stop_on_signals()
    try:
        app.run(host=host, port=port, debug=False)
    except KeyboardInterrupt:
        pass
    finally:
        if refresher.stop():
            collector.close()  # else a refresh still uses the followers; exiting closes their sockets
    return 0
