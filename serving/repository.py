"""The Triton model repository, derived from what the learner publishes.

The learner publishes manifest-verified versions at ``<models>/gmllm/<n>/``
(:mod:`learner.publish`); those directories are never written to. Beside them
this module keeps Triton's own layout (default ``<data_dir>/triton/repository``)::

    gmllm/config.pbtxt          python backend; version_policy all over the versions derived here
    gmllm/<n>/model.py          serving/triton_models/gmllm.py
    gmllm/<n>/artifact/...      the published files of version n, hard-linked (copied across filesystems)
    gmllm/osmf_code/...         the project's model code (infra, features, learner) the stub imports
    render/config.pbtxt         python backend, dynamic batching; the render settings as a parameter
    render/1/model.py           serving/triton_models/render.py
    render/osmf_code/...        the project's renderer code (infra, serving.render)
    creative/config.pbtxt       python BLS model; parameters gmllm_version = the live version,
                                group_versions = {group id: version} for groups served by another one
    creative/1/model.py         serving/triton_models/creative.py

No path of the machine that generated it appears in it (``model.py`` finds its
code next to itself), so the same directory loads unchanged in NVIDIA's Triton
container (docs/serving.md).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from infra.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS_SOURCE = Path(__file__).resolve().parent / "triton_models"
GMLLM, RENDER, CREATIVE = "gmllm", "render", "creative"
CODE_DIR = "osmf_code"

_CODE = {
    GMLLM: ("infra/__init__.py", "infra/settings.py", "infra/contracts", "features/__init__.py",
            "features/group.py", "features/rows.py", "learner/__init__.py", "learner/data.py", "learner/model"),
    RENDER: ("infra/__init__.py", "infra/settings.py", "infra/contracts", "serving/__init__.py", "serving/render"),
}

_GMLLM_IO = """
input [
  { name: "GROUP_TEXT" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "PRODUCT" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "PRODUCT_IMAGE" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "K" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "SEED" data_type: TYPE_INT64 dims: [ 1 ] optional: true },
  { name: "TEMPERATURE" data_type: TYPE_FP32 dims: [ 1 ] optional: true }
]
"""


def repository_path(settings: Settings) -> Path:
    """Where the Triton layout lives: ``serving.repository`` or ``<data_dir>/triton/repository``."""
    return settings.serving.repository or settings.data_dir / "triton" / "repository"


def published_repository(settings: Settings) -> Path:
    """The learner's model repository (``learner.loop.model_repository`` or ``<data_dir>/models``)."""
    return settings.learner.loop.model_repository or settings.data_dir / "models"


def _pbtxt_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid protobuf text-format string


def _parameters(params: dict[str, str]) -> str:
    items = ",\n".join(
        f"  {{ key: {_pbtxt_string(k)} value: {{ string_value: {_pbtxt_string(v)} }} }}" for k, v in params.items()
    )
    return f"parameters [\n{items}\n]\n"


def gmllm_config(settings: Settings) -> str:
    """``config.pbtxt`` of ``gmllm``.

    ``version_policy: { all: {} }`` over the derived layout: which versions are
    served is decided by which version directories the layout holds
    (``serving.version_policy``: live and previous, all good ones, or the live
    one only). The config itself never changes when versions come and go —
    Triton reloads *every* version of a model whose config changed (measured:
    a ``specific`` list that grows from [1] to [1, 2] reloads version 1 too),
    while with an unchanged config it loads only the new directory.
    """
    return (
        f'name: "{GMLLM}"\nbackend: "python"\nmax_batch_size: 0\nversion_policy: {{ all: {{}} }}\n{_GMLLM_IO}'
        'output [\n'
        '  { name: "PROMPTS" data_type: TYPE_STRING dims: [ -1 ] },\n'
        '  { name: "VALID" data_type: TYPE_BOOL dims: [ -1 ] },\n'
        '  { name: "MODEL_VERSION" data_type: TYPE_INT64 dims: [ 1 ] }\n]\n'
        f'instance_group [ {{ count: {settings.serving.instances} kind: KIND_CPU }} ]\n'
        + _parameters({
            "threads": str(settings.learner.threads),
            "max_new_tokens": str(settings.serving.max_new_tokens),
            "slate_size": str(settings.serving.slate_size),
            "temperature": str(settings.serving.temperature),
        })
    )


def render_config(settings: Settings) -> str:
    """``config.pbtxt`` of ``render`` (dynamic batching: the K renders of one slate arrive together)."""
    render = settings.render.model_dump(mode="json")
    return (
        f'name: "{RENDER}"\nbackend: "python"\nmax_batch_size: 16\n'
        'input [\n'
        '  { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] },\n'
        '  { name: "PRODUCT_IMAGE" data_type: TYPE_STRING dims: [ 1 ] optional: true }\n]\n'
        'output [ { name: "PNG" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        'dynamic_batching { max_queue_delay_microseconds: 500 }\n'
        f'instance_group [ {{ count: {settings.serving.instances} kind: KIND_CPU }} ]\n'
        + _parameters({"render": json.dumps(render, sort_keys=True)})
    )


def creative_config(settings: Settings, live_version: int, group_versions: Mapping[str, int] | None = None) -> str:
    """``config.pbtxt`` of ``creative``: parameter ``gmllm_version`` is the live version, ``group_versions``
    (JSON ``{group id: version}``) the groups another version serves (per-group promotion)."""
    cache = "response_cache { enable: true }\n" if settings.serving.response_cache else ""
    return (
        f'name: "{CREATIVE}"\nbackend: "python"\nmax_batch_size: 0\n{_GMLLM_IO}'
        'output [\n'
        '  { name: "PROMPTS" data_type: TYPE_STRING dims: [ -1 ] },\n'
        '  { name: "VALID" data_type: TYPE_BOOL dims: [ -1 ] },\n'
        '  { name: "PNGS" data_type: TYPE_STRING dims: [ -1 ] },\n'
        '  { name: "MODEL_VERSION" data_type: TYPE_INT64 dims: [ 1 ] }\n]\n'
        f'instance_group [ {{ count: {max(2, settings.serving.instances)} kind: KIND_CPU }} ]\n'
        f'{cache}'
        + _parameters({"gmllm_version": str(live_version),
                       "group_versions": json.dumps({str(g): int(v) for g, v in sorted((group_versions or {}).items())})})
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _copy_code(model_dir: Path, entries: Iterable[str]) -> None:
    target = model_dir / CODE_DIR
    tmp = model_dir / f".{CODE_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for entry in entries:
        source = PROJECT_ROOT / entry
        if source.is_dir():
            shutil.copytree(source, tmp / entry, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            dirs_exist_ok=True)
        else:
            (tmp / entry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tmp / entry)
    for package in {Path(e).parts[0] for e in entries}:  # make every copied directory a package
        for directory in [tmp / package, *(p for p in (tmp / package).rglob("*") if p.is_dir())]:
            (directory / "__init__.py").touch(exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of ``source`` under ``target`` (copy where linking is not possible)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in source.rglob("*"):
        dest = tmp / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


class TritonRepository:
    """The generated Triton layout of one settings object."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = repository_path(settings)
        self.published = published_repository(settings) / settings.learner.loop.model_name

    def prepare(self) -> Path:
        """(Re)write ``render`` and ``creative`` and the vendored code; keep gmllm versions already synced."""
        for name, source in ((RENDER, "render.py"), (CREATIVE, "creative.py")):
            _write(self.root / name / "1" / "model.py", (MODELS_SOURCE / source).read_text(encoding="utf-8"))
        _write(self.root / RENDER / "config.pbtxt", render_config(self.settings))
        if not (self.root / CREATIVE / "config.pbtxt").is_file():
            _write(self.root / CREATIVE / "config.pbtxt", creative_config(self.settings, -1))
        for name, entries in _CODE.items():
            _copy_code(self.root / name, entries)
        for version in self.gmllm_versions():  # model.py follows the code of this checkout
            _write(self.root / GMLLM / str(version) / "model.py", (MODELS_SOURCE / "gmllm.py").read_text("utf-8"))
        return self.root

    def gmllm_versions(self) -> list[int]:
        """gmllm versions present in the Triton layout."""
        root = self.root / GMLLM
        if not root.is_dir():
            return []
        return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())

    def add_version(self, version: int) -> Path:
        """Derive Triton's ``gmllm/<version>/`` from the published version (which is only read)."""
        source = self.published / str(version)
        if not source.is_dir():
            raise FileNotFoundError(f"{source}: no such published version")
        target = self.root / GMLLM / str(version)
        target.mkdir(parents=True, exist_ok=True)
        _link_tree(source, target / "artifact")
        _write(target / "model.py", (MODELS_SOURCE / "gmllm.py").read_text(encoding="utf-8"))
        return target

    def remove_version(self, version: int) -> None:
        """Drop ``gmllm/<version>/`` from the Triton layout (the published version stays)."""
        shutil.rmtree(self.root / GMLLM / str(version), ignore_errors=True)

    def write_gmllm_config(self) -> None:
        """Write ``gmllm/config.pbtxt`` (see :func:`gmllm_config`)."""
        _write(self.root / GMLLM / "config.pbtxt", gmllm_config(self.settings))

    def write_creative_config(self, live_version: int, group_versions: Mapping[str, int] | None = None) -> None:
        """Point ``creative`` at ``live_version``, and the groups in ``group_versions`` at theirs."""
        _write(self.root / CREATIVE / "config.pbtxt", creative_config(self.settings, live_version, group_versions))
