"""Running stream workers: one in this process, or N processes in one consumer group."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from infra.settings import Settings

if TYPE_CHECKING:
    import faust

WORKER_INDEX_ENV = "OSMF_WORKER_INDEX"
FEATURE_STORE_WAIT_S = 60.0
"""How long a starting worker waits for its feature store (Feast import, apply) before consuming."""


GC_THRESHOLD = (10_000, 10, 10)
"""Collector thresholds of a worker process: CPython's (700, 10, 10) ran a full collection over the
stage state (every id of the dedupe window) each time it grew by a quarter, ~25 % of the stage code's
CPU in docs/streams.md "Stage code CPU"."""


class WorkerStartError(RuntimeError):
    """The worker cannot start; the message names the fix."""


def run_worker(settings: Settings, index: int = 1, loglevel: str = "warning") -> None:
    """Run one worker until it is stopped (SIGINT/SIGTERM); serves metrics on ``metrics_port + index - 1``."""
    from streams.app import Worker
    from infra.kafka import ensure_topics, wait_for_kafka
    from infra.security import http_token, serve_metrics

    wait_for_kafka(settings.bootstrap_servers, timeout_s=30)
    ensure_topics(settings.bootstrap_servers, settings.topics.all_names(), settings.topics.partitions)
    if settings.streams.metrics_port:
        port = settings.streams.metrics_port + index - 1
        try:
            serve_metrics(port, host=settings.streams.metrics_host, token=http_token(settings.security))
        except OSError as exc:
            raise WorkerStartError(
                f"metrics port {settings.streams.metrics_host}:{port} is not free ({exc.strerror}): another worker may be running "
                f"(`pgrep -af 'osmf worker'`); stop it, or set OSMF_STREAMS__METRICS_PORT to a free port "
                "(0 turns metrics off)"
            ) from None
    worker = Worker(settings)
    if settings.features.enabled and not worker.start_feature_push(wait_s=FEATURE_STORE_WAIT_S):
        logging.getLogger(__name__).warning(
            "the feature store is not open yet; the stream starts anyway and features follow when it opens"
        )
    logging.getLogger("faust").setLevel(loglevel.upper())
    tune_gc()
    faust_worker(worker.app, loglevel).execute_from_commandline()


def faust_worker(app: faust.App, loglevel: str = "warning") -> faust.Worker:
    """Faust's worker for ``app`` without its terminal spinner.

    At log levels from WARNING up, Faust hangs the spinner's handler on the root
    logger and sets that logger to DEBUG, so every debug call of aiokafka and
    Faust on the hot path builds a log record (1-4 % of the worker's py-spy
    samples) for the spinner alone; the stderr handler keeps ``loglevel``.
    """
    import faust

    made = faust.Worker(app, loglevel=loglevel, quiet=True)
    made.spinner = None
    return made


def tune_gc() -> None:
    """Freeze what start-up allocated (imports, feature store) out of the collector's view and collect
    less often; reference counting still frees everything that is not in a cycle at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def spawn_workers(count: int, extra_args: Sequence[str] = ()) -> int:
    """Start ``count`` worker processes in one consumer group and wait; stop them all on SIGINT/SIGTERM.

    Returns the first non-zero exit status, or 0.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "-n", "1", "--index", str(i), *extra_args],
            env={**os.environ, WORKER_INDEX_ENV: str(i)},
        )
        for i in range(1, count + 1)
    ]

    def stop(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while any(proc.poll() is None for proc in procs):
        time.sleep(0.2)
        for proc in procs:
            if proc.returncode not in (None, 0) and status == 0:
                status = proc.returncode
                stop(signal.SIGTERM, None)
    return status
