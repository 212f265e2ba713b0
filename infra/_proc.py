"""Small helpers for the background servers infra starts (Tansu, SeaweedFS): pid files, liveness, logs."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Children spawned by this process, so that exited ones are reaped (not mistaken for live zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def spawn(argv: Sequence[str], log_file: Path, pid_file: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached (own session), output to ``log_file`` (previous log kept as ``.1``); write ``pid_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if log_file.exists():
        log_file.replace(log_file.with_name(log_file.name + ".1"))
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=log_file.parent,
        )
    _CHILDREN[proc.pid] = proc
    write_pid(pid_file, proc.pid)
    return proc


def read_pid(pid_file: Path) -> int | None:
    """The pid recorded in ``pid_file``, or None when there is none (or it is unreadable)."""
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    """True when process ``pid`` exists and is not a zombie."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str] | None:
    """Arguments of process ``pid`` (Linux /proc), or None when unknown."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def live_pid(pid_file: Path, marker: str) -> tuple[int | None, int | None]:
    """``(live_pid, stale_pid)`` for ``pid_file``: live when the process runs and its arguments contain ``marker``."""
    pid = read_pid(pid_file)
    if pid is None:
        return None, None
    if not is_alive(pid):
        return None, pid
    args = cmdline(pid)
    if args is not None and not any(marker in arg for arg in args):
        return None, pid  # the pid was reused by an unrelated process
    return pid, None


def find_process(required_args: Sequence[str]) -> int | None:
    """Pid of a live process (Linux /proc) whose arguments include every one of ``required_args``."""
    wanted = set(required_args)
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        args = cmdline(pid)
        if args and wanted.issubset(args) and is_alive(pid):
            return pid
    return None


def write_pid(pid_file: Path, pid: int) -> None:
    """Record ``pid`` in ``pid_file`` atomically."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = pid_file.with_name(pid_file.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(pid_file)


def terminate(pid: int, grace_s: float) -> None:
    """SIGTERM the process group of ``pid``, wait up to ``grace_s``, then SIGKILL it; wait until it is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not is_alive(pid):
                return
            time.sleep(0.05)


def port_is_free(host: str, port: int) -> bool:
    """True when ``host:port`` can be bound for listening right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def last_log_line(log_file: Path, prefer: str | None = None) -> str:
    """The last non-empty line of ``log_file`` (the last one matching regex ``prefer`` if any), ANSI codes removed."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return "(no log)"
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return "(empty log)"
    if prefer:
        matching = [line for line in lines if re.search(prefer, line)]
        if matching:
            return matching[-1]
    return lines[-1]
