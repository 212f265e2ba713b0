"""The tritonserver process: start, stop and status by pid, readiness wait, model load/unload.

What runs where (embedded default)::

    tritonserver              from nvidia-pytriton in .venv-triton; 127.0.0.1: HTTP serving.http_port,
                              gRPC serving.grpc_port, metrics serving.metrics_port; explicit model control
    triton_python_backend_stub  one per model instance, children of tritonserver, python3 of .venv-triton
                              (numpy<2: the stub is built against numpy 1)
    osmf serve watcher        (optional) main environment; loads new versions, smoke-tests, switches

The backend directory is assembled under ``<data_dir>/triton/backends/python``
from the wheel (``libtriton_python.so``, ``triton_python_backend_utils.py``,
the Python 3.11 stub). Shared-memory regions of the python backend carry a
prefix of their own (``osmf-<http_port>-``), so what a stopped server leaves in
``/dev/shm`` is found and removed by its prefix, never by a broad pattern.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import _proc
from infra.settings import Settings
from serving.repository import PROJECT_ROOT, TritonRepository

MARKER = "tritonserver"
STUB_PYTHON = "3.11"
MAKE_TARGET = "make .venv-triton"


class ServingError(RuntimeError):
    """A serving operation failed; the message is one line naming the cause and the fix."""


class TritonEnvError(ServingError):
    """The Triton backend environment (``.venv-triton``) is missing or incomplete."""


class PortBusyError(ServingError):
    """A port tritonserver needs is taken."""


class ModelLoadError(ServingError):
    """Triton refused to load a model; the message quotes Triton's own."""


@dataclass(frozen=True)
class TritonEnv:
    """Where the pieces of the Triton installation are."""

    root: Path
    python: Path
    site_packages: Path
    tritonserver: Path
    stub: Path
    backend_lib: Path
    backend_utils: Path
    libs: Path
    python_lib: Path

    @property
    def perf_analyzer(self) -> Path:
        return self.root / "bin" / "perf_analyzer"


def state_dir(settings: Settings) -> Path:
    """Pid, log and live-version files of serving: ``<data_dir>/serving``."""
    return settings.data_dir / "serving"


def find_env(settings: Settings) -> TritonEnv:
    """Locate the Triton environment or raise :class:`TritonEnvError` naming the make target."""
    root = settings.serving.env_dir
    if not root.is_absolute():
        root = PROJECT_ROOT / root
    python = root / "bin" / "python"
    if not python.exists():
        raise TritonEnvError(f"Triton backend environment missing: {python} not found; build it with `{MAKE_TARGET}`")
    found = sorted(root.glob("lib/python3*/site-packages"))
    if not found:
        raise TritonEnvError(f"{root}: no site-packages; rebuild it with `{MAKE_TARGET}`")
    site = found[0]
    server_dir = site / "pytriton" / "tritonserver"
    env = TritonEnv(
        root=root, python=python, site_packages=site,
        tritonserver=server_dir / "bin" / "tritonserver",
        stub=server_dir / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub",
        backend_lib=server_dir / "backends" / "python" / "libtriton_python.so",
        backend_utils=server_dir / "backends" / "python" / "triton_python_backend_utils.py",
        libs=site / "nvidia_pytriton.libs",
        python_lib=_base_python_lib(root),
    )
    for what in (env.tritonserver, env.stub, env.backend_lib, env.backend_utils):
        if not what.exists():
            raise TritonEnvError(f"{what} missing (nvidia-pytriton not installed in {root}); run `{MAKE_TARGET}`")
    numpy = sorted(site.glob("numpy-*.dist-info"))
    if not numpy or not numpy[0].name.startswith("numpy-1."):
        raise TritonEnvError(f"{site}: the stub needs numpy<2 (found {numpy[0].name if numpy else 'none'}); "
                             f"run `{MAKE_TARGET}`")
    return env


def _base_python_lib(root: Path) -> Path:
    """The interpreter's own ``lib/`` (libpython) behind the venv, from ``pyvenv.cfg``."""
    cfg = root / "pyvenv.cfg"
    if cfg.is_file():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                return Path(value.strip()).parent / "lib"
    return root / "lib"


def _backend_dir(settings: Settings, env: TritonEnv) -> Path:
    backends = settings.data_dir / "triton" / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (env.backend_lib, env.backend_utils, env.stub):
        target = python_dir / source.name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copy2(source, target)
    return backends


def shm_prefix(settings: Settings) -> str:
    """Prefix of this server's python-backend shared-memory regions in /dev/shm."""
    return f"osmf-{settings.serving.http_port}-"


def server_env(env: TritonEnv) -> dict[str, str]:
    """Environment of tritonserver: the stub finds ``python3`` of .venv-triton on PATH, libpython and the wheel's libs."""
    out = dict(os.environ)
    out["PATH"] = f"{env.root / 'bin'}{os.pathsep}{out.get('PATH', '')}"
    out["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(env.libs), str(env.python_lib), out.get("LD_LIBRARY_PATH", "")) if p
    )
    out.pop("VIRTUAL_ENV", None)
    out.pop("PYTHONPATH", None)
    out["PYTHONNOUSERSITE"] = "1"
    out["HF_HUB_OFFLINE"] = "1"
    out["TRANSFORMERS_OFFLINE"] = "1"
    out["OMP_NUM_THREADS"] = out.get("OMP_NUM_THREADS", "1")
    return out


def server_argv(settings: Settings, env: TritonEnv, repository: Path, backends: Path) -> list[str]:
    """tritonserver's command line (explicit model control, loopback only, no GPU metrics)."""
    s = settings.serving
    argv = [
        str(env.tritonserver),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        "--model-control-mode=explicit",
        f"--http-address={s.host}", f"--http-port={s.http_port}",
        f"--grpc-address={s.host}", f"--grpc-port={s.grpc_port}",
        f"--metrics-address={s.host}", f"--metrics-port={s.metrics_port}",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
        "--exit-timeout-secs=10",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix(settings)}",
        "--log-verbose=0",
    ]
    if s.response_cache:
        argv.append("--cache-config=local,size=67108864")
    return argv


# ---------------------------------------------------------------------------- HTTP admin (stdlib only)


def _http(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None,
          timeout: float = 5.0) -> tuple[int, Any]:
    url = f"http://{settings.serving.host}:{settings.serving.http_port}{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return exc.code, {"error": raw.decode(errors="replace")}


def is_live(settings: Settings) -> bool:
    """True when tritonserver answers its liveness endpoint."""
    try:
        return _http(settings, "GET", "/v2/health/live", timeout=1.0)[0] == 200
    except OSError:
        return False


def is_ready(settings: Settings) -> bool:
    """True when tritonserver is ready (strict readiness: every loaded model ready)."""
    try:
        return _http(settings, "GET", "/v2/health/ready", timeout=1.0)[0] == 200
    except OSError:
        return False


def load_model(settings: Settings, name: str, timeout: float | None = None) -> None:
    """Load (or reload) ``name`` from the repository on disk; :class:`ModelLoadError` quotes Triton's message."""
    try:
        status, body = _http(settings, "POST", f"/v2/repository/models/{name}/load", {},
                             timeout=timeout or settings.serving.load_timeout_s)
    except OSError as exc:
        raise ModelLoadError(f"model {name!r}: Triton did not answer the load request ({exc})") from None
    if status != 200:
        message = (body or {}).get("error", f"HTTP {status}")
        raise ModelLoadError(f"model {name!r} failed to load: {' '.join(str(message).split())}")


def unload_model(settings: Settings, name: str) -> None:
    """Unload ``name`` (no error when it is not loaded)."""
    _http(settings, "POST", f"/v2/repository/models/{name}/unload", {}, timeout=settings.serving.load_timeout_s)


def repository_index(settings: Settings) -> list[dict[str, Any]]:
    """Triton's view of the repository: ``[{name, version, state, reason}]``."""
    status, body = _http(settings, "POST", "/v2/repository/index", {})
    return body if status == 200 and isinstance(body, list) else []


def ready_versions(settings: Settings, name: str) -> list[int]:
    """Versions of ``name`` Triton has READY."""
    return sorted(int(m["version"]) for m in repository_index(settings)
                  if m.get("name") == name and m.get("state") == "READY" and str(m.get("version", "")).isdigit())


def model_ready(settings: Settings, name: str, version: int | None = None) -> bool:
    """True when ``name`` (``version``) is ready for inference."""
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version is not None else "") + "/ready"
    try:
        return _http(settings, "GET", path, timeout=2.0)[0] == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------- process


@dataclass(frozen=True)
class ServerStatus:
    """What ``osmf serve status`` reports."""

    pid: int | None
    live: bool
    ready: bool
    models: list[dict[str, Any]]
    stale_pid: int | None = None

    @property
    def running(self) -> bool:
        return self.pid is not None


def _pid_file(settings: Settings) -> Path:
    return state_dir(settings) / "triton.pid"


def log_file(settings: Settings) -> Path:
    """tritonserver's log."""
    return state_dir(settings) / "triton.log"


def status(settings: Settings) -> ServerStatus:
    """The server's pid (from the pid file, checked), liveness, readiness and models."""
    pid, stale = _proc.live_pid(_pid_file(settings), MARKER)
    if pid is None:
        return ServerStatus(None, False, False, [], stale)
    live = is_live(settings)
    return ServerStatus(pid, live, live and is_ready(settings), repository_index(settings) if live else [])


def start_server(settings: Settings, wait: bool = True) -> int:
    """Start tritonserver (no models loaded yet) and wait until it is live; return its pid.

    Raises :class:`TritonEnvError`, :class:`PortBusyError` or :class:`ServingError`
    with a one-line message.
    """
    current = status(settings)
    if current.pid is not None:
        return current.pid
    env = find_env(settings)
    s = settings.serving
    for field, port in (("http_port", s.http_port), ("grpc_port", s.grpc_port), ("metrics_port", s.metrics_port)):
        if not _proc.port_is_free(s.host, port):
            raise PortBusyError(f"serving.{field}: port {port} on {s.host} is in use; stop what holds it or set "
                                f"OSMF_SERVING__{field.upper()} to a free port")
    repository = TritonRepository(settings)
    repository.prepare()
    backends = _backend_dir(settings, env)
    cleanup_shm(settings)
    proc = _proc.spawn(server_argv(settings, env, repository.root, backends), log_file(settings),
                       _pid_file(settings), env=server_env(env))
    if wait:
        deadline = time.monotonic() + s.start_timeout_s
        while not is_live(settings):
            if not _proc.is_alive(proc.pid):
                _pid_file(settings).unlink(missing_ok=True)
                raise ServingError(f"tritonserver exited at start: {_proc.last_log_line(log_file(settings), 'E[0-9]|rror')}"
                                   f" (log: {log_file(settings)})")
            if time.monotonic() > deadline:
                stop_server(settings)
                raise ServingError(f"tritonserver not live after {s.start_timeout_s:.0f}s; see {log_file(settings)}")
            time.sleep(0.1)
    return proc.pid


def stop_server(settings: Settings, grace_s: float = 15.0) -> int | None:
    """Stop tritonserver and its stubs (its process group) by pid; remove its shared-memory files. Returns the pid."""
    pid, _stale = _proc.live_pid(_pid_file(settings), MARKER)
    if pid is not None:
        if is_live(settings):  # unload first, so the stubs exit cleanly and free their shared memory
            for model in ("creative", "gmllm", "render"):
                try:
                    _http(settings, "POST", f"/v2/repository/models/{model}/unload", {}, timeout=grace_s)
                except OSError:
                    break
        _proc.terminate(pid, grace_s)
    _pid_file(settings).unlink(missing_ok=True)
    cleanup_shm(settings)
    return pid


def cleanup_shm(settings: Settings) -> list[str]:
    """Remove /dev/shm files left by a server of these settings (found by this server's own prefix)."""
    shm = Path("/dev/shm")
    removed = []
    if shm.is_dir():
        for path in shm.glob(f"{shm_prefix(settings)}*"):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
