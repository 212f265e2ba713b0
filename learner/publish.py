"""Publish a model version into the model repository, atomically.

Layout (the one Triton reads, docs/architecture.md §3)::

    <repo>/<model>/<n>/...        one directory per version, n = 1, 2, ...
    <repo>/<model>/LATEST.json    {"version": n, "published_at": ..., ...} (announcement)

A version goes live for every group, or, when its publish metadata names
``groups`` (per-group promotion, ``learner.loop.promotion = "group"``), for
those groups only; :func:`routing` adds the versions up to which version
serves each group, for the learner and for serving alike.

A version is copied completely under a temporary name (``.tmp-…``, never a
number, so no loader picks it up), its files are flushed to disk, it is
verified, and only then renamed to the next version number. A publish killed
halfway leaves at most a ``.tmp-…`` directory, removed by the next publish.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
LATEST = "LATEST.json"
GROUPS = "groups"
"""Publish metadata key: the groups a version goes live for (absent or null: every group)."""


class PublishError(RuntimeError):
    """Publishing failed; the repository is unchanged."""


@dataclass(frozen=True)
class Published:
    """A version now live in the repository."""

    model: str
    version: int
    path: Path


def versions(repo: Path, model: str) -> list[int]:
    """Published version numbers of ``model``, ascending (temporary directories are ignored)."""
    root = repo / model
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(repo: Path, model: str) -> int | None:
    """The newest published version, or None."""
    found = versions(repo, model)
    return found[-1] if found else None


@dataclass(frozen=True)
class Routing:
    """Which published version serves each group.

    ``default`` serves every group not in ``groups`` (and groups not seen yet);
    ``groups`` maps the others to their version.

    >>> r = Routing().then(1, None).then(2, ["mugs/g0"]).then(3, ["mugs/g1"])
    >>> r.version_for("mugs/g0"), r.version_for("mugs/g1"), r.version_for("pens/g0"), r.versions()
    (2, 3, 1, [1, 2, 3])
    >>> r.then(4, None)
    Routing(default=4, groups={})
    """

    default: int | None = None
    groups: dict[str, int] = field(default_factory=dict)

    def version_for(self, group: str) -> int | None:
        """The version that serves ``group``."""
        return self.groups.get(group, self.default)

    def versions(self) -> list[int]:
        """Every version that serves some group, ascending."""
        return sorted({*self.groups.values(), *([] if self.default is None else [self.default])})

    def then(self, version: int, groups: Sequence[str] | None) -> Routing:
        """The routing once ``version`` goes live for ``groups`` (None: for every group, as the new default)."""
        if groups is None:
            return Routing(version, {})
        routed = {**self.groups, **{str(g): version for g in groups}}
        return Routing(self.default, {g: v for g, v in sorted(routed.items()) if v != self.default})


def published_groups(repo: Path, model: str, version: int) -> list[str] | None:
    """The groups ``version`` was published for (``published.groups`` of its ``gmllm.json``); None: every group
    (also for a version without that file, e.g. a base checkpoint)."""
    path = repo / model / str(version) / "gmllm.json"
    try:
        published = json.loads(path.read_text(encoding="utf-8")).get("published") or {}
    except (OSError, ValueError):
        return None
    groups = published.get(GROUPS) if isinstance(published, dict) else None
    return None if groups is None else [str(g) for g in groups]


def routing(repo: Path, model: str, skip: Collection[int] = ()) -> Routing:
    """The routing the published versions add up to, in publish order; versions in ``skip`` (e.g. ones serving
    refused) are left out."""
    out = Routing()
    for version in versions(repo, model):
        if version not in skip:
            out = out.then(version, published_groups(repo, model, version))
    return out


def publish_version(
    source: Path,
    repo: Path,
    model: str,
    *,
    verify: Callable[[Path], None] | None = None,
    metadata: dict[str, Any] | None = None,
    on_copied: Callable[[Path], None] | None = None,
) -> Published:
    """Copy the artifact directory ``source`` into ``repo/model/<next>`` atomically.

    ``verify`` (e.g. the artifact loader's manifest check) runs on the copy
    before it goes live; ``on_copied`` is a test hook called between copy and
    rename. Raises :class:`PublishError` when ``source`` is missing or the copy
    fails verification.
    """
    if not source.is_dir():
        raise PublishError(f"{source}: no such model directory; save a model version there first")
    root = repo / model
    root.mkdir(parents=True, exist_ok=True)
    with _repo_lock(root):
        _remove_stale_temporaries(root)
        tmp = root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        shutil.copytree(source, tmp)
        _fsync_tree(tmp)
        if on_copied is not None:
            on_copied(tmp)
        try:
            if verify is not None:
                verify(tmp)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PublishError(f"{source}: refused, the copy does not verify: {exc}") from exc
        version = (latest_version(repo, model) or 0) + 1
        final = root / str(version)
        os.rename(tmp, final)
        _fsync_dir(root)
        _announce(root, version, metadata or {})
    return Published(model, version, final)


def _announce(root: Path, version: int, metadata: dict[str, Any]) -> None:
    payload = {"version": version, "published_at": time.time(), **metadata}
    tmp = root / f"{TMP_PREFIX}{LATEST}"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, root / LATEST)


def read_announcement(repo: Path, model: str) -> dict[str, Any] | None:
    """The last announcement (``LATEST.json``), or None before the first publish."""
    path = repo / model / LATEST
    return json.loads(path.read_text()) if path.is_file() else None


@contextmanager
def _repo_lock(root: Path) -> Iterator[None]:
    with open(root / ".publish.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_temporaries(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
