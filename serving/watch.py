"""The live-version watcher as a process: ``python -m serving.watch`` (started by ``osmf serve start``).

It reads the same settings as the command that started it (inherited
``OSMF_*`` variables / ``OSMF_CONFIG``), checks the published repository every
``serving.watch_interval_s`` and promotes new versions (:mod:`serving.live`).
Each outcome is one line in ``<data_dir>/serving/watcher.log``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from infra import _proc
from infra.settings import Settings, load_settings
from serving import server
from serving.live import VersionManager, Watcher

MARKER = "serving.watch"


def pid_file(settings: Settings) -> Path:
    return server.state_dir(settings) / "watcher.pid"


def start_watcher(settings: Settings) -> int:
    """Spawn the watcher process (detached); returns its pid (an already running one is kept)."""
    pid, _ = _proc.live_pid(pid_file(settings), MARKER)
    if pid is not None:
        return pid
    env = {**os.environ, "OSMF_DATA_DIR": str(Path(settings.data_dir).resolve())}  # it runs in its state folder
    proc = _proc.spawn([sys.executable, "-m", MARKER], server.state_dir(settings) / "watcher.log", pid_file(settings),
                       env=env)
    return proc.pid


def stop_watcher(settings: Settings) -> int | None:
    """Stop the watcher by its pid; returns the pid or None."""
    pid, _ = _proc.live_pid(pid_file(settings), MARKER)
    if pid is not None:
        _proc.terminate(pid, 10.0)
    pid_file(settings).unlink(missing_ok=True)
    return pid


def main() -> int:
    settings = load_settings()

    def echo(line: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}", flush=True)

    watcher = Watcher(VersionManager(settings, echo=echo))
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop())
    echo(f"watching {watcher.manager.repository.published} every {watcher.interval_s}s")
    watcher.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
