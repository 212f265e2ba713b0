"""Atomic publishing of model versions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learner.publish import PublishError, latest_version, publish_version, read_announcement, versions


def _artifact(path: Path, payload: bytes = b"weights") -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    (path / "config.json").write_text("{}")
    return path


def test_versions_are_numbered_and_announced(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = publish_version(_artifact(tmp_path / "a"), repo, "gmllm", metadata={"round": 1})
    second = publish_version(_artifact(tmp_path / "b"), repo, "gmllm")
    assert (first.version, second.version) == (1, 2)
    assert versions(repo, "gmllm") == [1, 2]
    assert read_announcement(repo, "gmllm")["version"] == 2
    assert (repo / "gmllm" / "2" / "model.safetensors").read_bytes() == b"weights"


def test_failed_verification_publishes_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_version(_artifact(tmp_path / "a"), repo, "gmllm")

    def refuse(_: Path) -> None:
        raise ValueError("sha256 mismatch in model.safetensors")

    with pytest.raises(PublishError, match="sha256 mismatch"):
        publish_version(_artifact(tmp_path / "b"), repo, "gmllm", verify=refuse)
    assert versions(repo, "gmllm") == [1]
    assert [p.name for p in (repo / "gmllm").iterdir() if p.name.startswith(".tmp-") and p.is_dir()] == []


def test_missing_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="no such model directory"):
        publish_version(tmp_path / "nope", tmp_path / "repo", "gmllm")


KILLED_PUBLISH = """
import sys, time
from pathlib import Path
from learner.publish import publish_version
publish_version(Path(sys.argv[1]), Path(sys.argv[2]), "gmllm",
                on_copied=lambda tmp: (print("copied", flush=True), time.sleep(60)))
"""


def test_publish_killed_halfway_leaves_old_version_loadable(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_version(_artifact(tmp_path / "v1", b"old"), repo, "gmllm")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISH, str(_artifact(tmp_path / "v2", b"new" * 100_000)), str(repo)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout.readline().strip() == "copied"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_version(repo, "gmllm") == 1
    assert (repo / "gmllm" / "1" / "model.safetensors").read_bytes() == b"old"
    assert read_announcement(repo, "gmllm")["version"] == 1
    again = publish_version(_artifact(tmp_path / "v3", b"newer"), repo, "gmllm")
    assert again.version == 2
    assert not [p for p in (repo / "gmllm").iterdir() if p.name.startswith(".tmp-") and p.is_dir()]


def test_a_published_gmllm_version_is_readable_by_other_users(tiny_gmllm, tmp_path: Path) -> None:  # noqa: ANN001
    import stat

    from learner.round import publish_candidate

    version = publish_candidate(tiny_gmllm, tmp_path / "repo", "gmllm", {"round": 1})
    root = tmp_path / "repo" / "gmllm" / str(version)
    assert stat.S_IMODE(root.stat().st_mode) & 0o055 == 0o055
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044 for f in root.iterdir())
    assert not any(p.name.startswith(".candidate-") for p in (tmp_path / "repo").iterdir())
