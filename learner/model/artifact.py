"""Model artifacts: one directory per version, safetensors + JSON + tokenizer + a sha256 manifest.

Layout (docs/architecture.md §3)::

    config.json  generation_config.json  model.safetensors
    tokenizer.json  tokenizer_config.json  processor_config.json
    gmllm.json        what OSMF needs beside transformers' files (formats, image tokens, training summary)
    manifest.json     {"files": {name: {"sha256": …, "bytes": …}}, …} for every other file

:func:`write_artifact` writes everything under a temporary name next to the
target and renames it into place, so a reader sees the whole version or
nothing. :func:`verify_artifact` refuses a directory whose files do not match
the manifest (a tampered or truncated weight file, a missing or extra file)
and any pickle-based file (``.bin``, ``.pt``, ``.pkl``, …), before anything
is deserialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
INFO = "gmllm.json"
ARTIFACT_FORMAT = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
"""File types that can run code when loaded; an artifact holding one is refused."""


class ArtifactError(ValueError):
    """A model directory is missing, incomplete, tampered with, or holds pickles; the message says which file."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(
        str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file() and path.name != MANIFEST
    )


def write_manifest(directory: Path) -> dict[str, Any]:
    """Hash every file under ``directory`` into ``manifest.json``; refuse pickles."""
    files = {}
    for name in _files(directory):
        if name.endswith(PICKLE_SUFFIXES):
            raise ArtifactError(f"{directory / name}: pickle-based files are not allowed in a model artifact")
        path = directory / name
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": ARTIFACT_FORMAT, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def verify_artifact(directory: str | Path) -> dict[str, Any]:
    """Check ``directory`` against its manifest; return the manifest or raise :class:`ArtifactError`."""
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such model directory")
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}; not an OSMF model artifact (write one with GMLLM.save)")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        listed: dict[str, dict[str, Any]] = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{manifest_file}: unreadable manifest ({exc})") from None
    present = _files(root)
    for name in present:
        if name.endswith(PICKLE_SUFFIXES):
            raise ArtifactError(f"{root / name}: pickle-based file refused; model weights must be safetensors")
        if name not in listed:
            raise ArtifactError(f"{root / name}: not in the manifest; the artifact was modified after it was written")
    for name, entry in listed.items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing; the artifact is incomplete")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise ArtifactError(
                f"{path}: sha256 does not match the manifest; the file was changed or corrupted — "
                "refusing to load it (re-publish the model)"
            )
    config = root / "config.json"
    if config.is_file() and "auto_map" in json.loads(config.read_text(encoding="utf-8")):
        raise ArtifactError(f"{config}: custom code (auto_map) is not allowed in a model artifact")
    return manifest


def write_artifact(directory: str | Path, write: Callable[[Path], None], info: dict[str, Any]) -> Path:
    """Call ``write(tmp_dir)``, add ``gmllm.json`` and the manifest, then rename the whole into ``directory``.

    An existing directory at the target is replaced only once the new one is complete.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a model server running as another user must read it
    try:
        write(tmp)
        for path in tmp.rglob("*"):  # some writers (safetensors) make files 0600
            path.chmod(0o755 if path.is_dir() else 0o644)
        (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        write_manifest(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_info(directory: str | Path) -> dict[str, Any]:
    """The ``gmllm.json`` of a verified artifact."""
    path = Path(directory) / INFO
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; not an OSMF G-MLLM artifact")
    return json.loads(path.read_text(encoding="utf-8"))
