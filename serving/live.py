"""Live versions: load each newly announced G-MLLM version, smoke-test it, then make it the one clients get.

State (``<data_dir>/serving/live.json``)::

    {"live": 2, "previous": 1, "good": [1, 2], "refused": {"3": "reason"}, "rolled_back": [],
     "events": [{"at": ..., "version": 2, "event": "live", "publish_to_live_s": 4.1}, ...]}

A candidate version is (1) checked against its manifest, (2) derived into
Triton's layout and loaded beside the versions already serving, (3) asked for
a slate of prompts that must all parse and rendered into a PNG that must decode
at the configured size, and only then (4) made live by pointing ``creative``
at it. A failure at any step refuses the version: it is removed from Triton's
layout (the published directory is never touched), the reason is recorded
and reported, and the live version keeps serving. ``rollback`` points
``creative`` back at the previous good version, which ``live_and_previous``
keeps loaded, so it is a switch, not a load.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.contracts.prompt import PromptError, parse_prompt
from infra.settings import Settings
from learner.model.artifact import ArtifactError, verify_artifact
from learner.publish import read_announcement, versions as published_versions
from serving import server
from serving.repository import CREATIVE, GMLLM, RENDER, TritonRepository

SMOKE_GROUP = "group smoke/g0 | 100% of smoke | ctr 1.0%"
SMOKE_PRODUCT = {"id": "smoke-product", "category": "smoke", "title": "Smoke test product", "price": 1.0}


@dataclass
class LiveState:
    """Which version clients get, which one rollback returns to, and what was refused."""

    live: int | None = None
    previous: int | None = None
    good: list[int] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    rolled_back: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def record(self, version: int, event: str, **details: Any) -> None:
        self.events.append({"at": time.time(), "version": version, "event": event, **details})
        del self.events[:-200]


def state_file(settings: Settings) -> Path:
    return server.state_dir(settings) / "live.json"


def read_state(settings: Settings) -> LiveState:
    """The live state (empty before the first version went live)."""
    path = state_file(settings)
    if not path.is_file():
        return LiveState()
    raw = json.loads(path.read_text())
    return LiveState(**{k: raw[k] for k in LiveState.__dataclass_fields__ if k in raw})


def write_state(settings: Settings, state: LiveState) -> None:
    path = state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Outcome:
    """What happened to one version: ``live``, ``refused`` (with the reason) or ``unchanged``."""

    version: int
    result: str
    reason: str = ""
    seconds: float = 0.0
    publish_to_live_s: float | None = None


class VersionManager:
    """Promotes, refuses and rolls back gmllm versions on a running tritonserver."""

    def __init__(self, settings: Settings, echo: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.repository = TritonRepository(settings)
        self.echo = echo or (lambda line: None)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ helpers

    def _kept(self, state: LiveState, extra: int | None = None) -> list[int]:
        policy = self.settings.serving.version_policy
        wanted = {state.live} if policy == "latest" else {state.live, state.previous}
        if policy == "all":
            wanted |= set(state.good)
        wanted.add(extra)
        return sorted(v for v in wanted if v is not None)

    def _sync_layout(self, versions: list[int]) -> None:
        for version in versions:
            if not (self.repository.root / GMLLM / str(version) / "artifact").is_dir():
                self.repository.add_version(version)
        for version in self.repository.gmllm_versions():
            if version not in versions:
                self.repository.remove_version(version)
        self.repository.write_gmllm_config()

    def _load_gmllm(self, versions: list[int]) -> None:
        self._sync_layout(versions)
        if versions:
            server.load_model(self.settings, GMLLM)
        else:
            server.unload_model(self.settings, GMLLM)

    def _switch(self, version: int) -> None:
        """Point ``creative`` at ``version`` (a reload of the small BLS model)."""
        self.repository.write_creative_config(version)
        server.load_model(self.settings, CREATIVE)

    # ------------------------------------------------------------------ start

    def start(self) -> LiveState:
        """Load render, the kept gmllm versions and creative on a fresh server; promote the newest if none is live."""
        self.repository.prepare()
        server.load_model(self.settings, RENDER)
        state = read_state(self.settings)
        available = set(published_versions(self.repository.published.parent, self.settings.learner.loop.model_name))
        if state.live is not None and state.live not in available:
            state = LiveState(refused=state.refused)  # the repository was replaced: start over
        if state.previous is not None and state.previous not in available:
            state.previous = None
        if state.live is not None:
            try:
                self._load_gmllm(self._kept(state))
                self._switch(state.live)
            except server.ModelLoadError as exc:
                self.echo(f"live version {state.live} no longer loads ({exc}); looking for another")
                state = LiveState(refused={**state.refused, str(state.live): str(exc)})
            write_state(self.settings, state)
        if state.live is None:
            self.repository.write_gmllm_config()
            self.check()
        return read_state(self.settings)

    # ------------------------------------------------------------------ promote

    def check(self) -> Outcome | None:
        """Promote the newest published version that is newer than the live one and not refused; None if none."""
        state = read_state(self.settings)
        repo, model = self.repository.published.parent, self.settings.learner.loop.model_name
        newest = [v for v in published_versions(repo, model)
                  if (state.live is None or v > state.live) and str(v) not in state.refused
                  and v not in state.rolled_back and v not in state.good]
        if not newest:
            return None
        return self.promote(newest[-1])

    def promote(self, version: int) -> Outcome:
        """Load, smoke-test and make ``version`` live; refuse it (keeping the live one serving) on any failure."""
        with self._lock:
            started = time.monotonic()
            state = read_state(self.settings)
            try:
                verify_artifact(self.repository.published / str(version))
                self._load_gmllm(self._kept(state, extra=version))
                if version not in server.ready_versions(self.settings, GMLLM):
                    raise server.ModelLoadError(f"model 'gmllm' version {version} is not ready after loading")
                self.smoke(version)
            except (ArtifactError, server.ServingError, SmokeError, OSError) as exc:
                reason = " ".join(str(exc).split())
                state.refused[str(version)] = reason
                state.record(version, "refused", reason=reason)
                write_state(self.settings, state)
                self.echo(f"version {version} refused: {reason}")
                self._restore(state)
                return Outcome(version, "refused", reason, time.monotonic() - started)
            self._switch(version)
            state.previous, state.live = state.live, version
            if version not in state.good:
                state.good.append(version)
            announcement = read_announcement(self.repository.published.parent, self.settings.learner.loop.model_name)
            to_live = None
            if announcement and announcement.get("version") == version and announcement.get("published_at"):
                to_live = max(0.0, time.time() - float(announcement["published_at"]))
            state.record(version, "live", seconds=time.monotonic() - started, publish_to_live_s=to_live)
            write_state(self.settings, state)
            try:
                self._load_gmllm(self._kept(state))  # unload what the policy no longer keeps
            except server.ModelLoadError as exc:
                self.echo(f"version {version} is live; trimming older versions failed: {exc}")
            self.echo(f"version {version} is live (previous {state.previous})")
            return Outcome(version, "live", "", time.monotonic() - started, to_live)

    def _restore(self, state: LiveState) -> None:
        """After a refusal: serve only the kept versions again (the refused one leaves Triton's layout)."""
        kept = self._kept(state)
        try:
            self._load_gmllm(kept)
        except server.ModelLoadError as exc:
            self.echo(f"restoring versions {kept} failed: {exc}")

    def smoke(self, version: int) -> None:
        """Ask ``gmllm`` ``version`` for a slate; every prompt must parse and render to a PNG of the configured size."""
        from serving.triton_io import TritonCalls

        calls = TritonCalls(self.settings, protocol="http")
        try:
            k = max(2, min(4, self.settings.serving.slate_size))
            prompts, valid, served = calls.generate(SMOKE_GROUP, SMOKE_PRODUCT, None, k=k, seed=0, version=version)
            if served != version:
                raise SmokeError(f"version {version} smoke test: answered by version {served}")
            if len(prompts) != k or not any(valid):
                raise SmokeError(f"version {version} smoke test: no valid prompt among {len(prompts)} (asked {k})")
            for text, ok in zip(prompts, valid):
                if not ok:
                    continue  # an unfinished sample (max_new_tokens reached) is flagged, not served
                try:
                    parse_prompt(text)
                except PromptError as exc:
                    raise SmokeError(f"version {version} smoke test: prompt {text!r} flagged valid but does not "
                                     f"parse ({exc})") from None
            png = calls.render(prompts[valid.index(True)], None)
            from PIL import Image

            try:
                image = Image.open(io.BytesIO(png))
                image.load()
            except Exception as exc:  # noqa: BLE001 - any decoder error means a broken PNG
                raise SmokeError(f"version {version} smoke test: rendered PNG does not decode ({exc})") from None
            size = self.settings.render.size
            if image.size != (size, size):
                raise SmokeError(f"version {version} smoke test: image is {image.size}, expected {size}x{size}")
        except server.ServingError:
            raise
        except SmokeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing request is a failed smoke test
            raise SmokeError(f"version {version} smoke test failed: {' '.join(str(exc).split())}") from None
        finally:
            calls.close()

    # ------------------------------------------------------------------ rollback

    def rollback(self) -> Outcome:
        """Make the previous good version live again (a switch of ``creative``); the rolled-back one stays out."""
        with self._lock:
            started = time.monotonic()
            state = read_state(self.settings)
            if state.live is None or state.previous is None:
                raise server.ServingError("no previous good version to roll back to; `osmf serve versions` lists them")
            target, bad = state.previous, state.live
            if target not in server.ready_versions(self.settings, GMLLM):
                self._load_gmllm(sorted({target, bad}))
            self._switch(target)
            earlier = [v for v in state.good if v < target and v not in state.rolled_back]
            state.live, state.previous = target, (earlier[-1] if earlier else None)
            state.rolled_back.append(bad)
            seconds = time.monotonic() - started
            state.record(bad, "rolled_back", to=target, seconds=seconds)
            write_state(self.settings, state)
            return Outcome(target, "live", f"rolled back from {bad}", seconds)


class SmokeError(RuntimeError):
    """A loaded version failed its smoke test."""


class Watcher:
    """Polls the published repository and promotes new versions (``osmf serve start`` runs one in the background)."""

    def __init__(self, manager: VersionManager, interval_s: float | None = None) -> None:
        self.manager = manager
        self.interval_s = interval_s or manager.settings.serving.watch_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.outcomes: list[Outcome] = []

    def run(self) -> None:
        """Check until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                outcome = self.manager.check()
                if outcome is not None:
                    self.outcomes.append(outcome)
            except server.ServingError as exc:
                self.manager.echo(f"watcher: {exc}")
            self._stop.wait(self.interval_s)

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self.run, name="osmf-serving-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def versions_table(settings: Settings) -> list[dict[str, Any]]:
    """Every published version with its serving state and the gate figures of the round that produced it."""
    from learner.history import read_rounds
    from learner.loop import history_path

    state = read_state(settings)
    repo, model = TritonRepository(settings).published.parent, settings.learner.loop.model_name
    rounds = {r.get("version"): r for r in read_rounds(history_path(repo, model)) if r.get("version") is not None}
    rows = []
    for version in published_versions(repo, model):
        if version == state.live:
            what = "live"
        elif str(version) in state.refused:
            what = "refused"
        elif version in state.rolled_back:
            what = "rolled back"
        elif version == state.previous:
            what = "previous (loaded)"
        elif version in state.good:
            what = "was live"
        else:
            what = "published"
        gate = rounds.get(version, {}).get("gate", {})
        rows.append({"version": version, "state": what, "reason": state.refused.get(str(version), ""),
                     "decision": rounds.get(version, {}).get("decision", ""), "gate": gate})
    return rows
