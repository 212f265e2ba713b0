"""Live versions: load each newly announced G-MLLM version, smoke-test it, then make it the one clients get.

State (``<data_dir>/serving/live.json``)::

    {"live": 2, "previous": 1, "good": [1, 2, 4], "refused": {"3": "reason"}, "rolled_back": [],
     "groups": {"mugs/g0": 4},
     "promotions": [{"version": 4, "groups": ["mugs/g0"], "before": {"live": 2, "previous": 1, "groups": {}}}],
     "events": [{"at": ..., "version": 2, "event": "live", "publish_to_live_s": 4.1}, ...]}

``live`` serves every group that ``groups`` does not route elsewhere. A
version published for some groups only (``published.groups`` in its
``gmllm.json``, :func:`learner.publish.published_groups`) goes live for those
groups: ``live`` stays and ``groups`` routes them to it; a version published
for every group becomes ``live`` and clears ``groups``. ``promotions`` keeps
the routing each promotion replaced (newest last), so ``rollback`` undoes the
last promotion exactly.

A candidate version is (1) checked against its manifest, (2) derived into
Triton's layout and loaded beside the versions already serving, (3) asked for
a slate of prompts that must all parse and rendered into a PNG that must decode
at the configured size, and only then (4) made live by pointing ``creative``
at it. A failure at any step refuses the version: it is removed from Triton's
layout (the published directory is never touched), the reason is recorded
and reported, and the live version keeps serving. ``rollback`` points
``creative`` back at the previous good version, which ``live_and_previous``
keeps loaded (with the versions of the routing before the last promotion),
so it is a switch, not a load.
"""

from __future__ import annotations

import copy
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
from learner.publish import Routing, published_groups, read_announcement, versions as published_versions
from serving import server
from serving.repository import CREATIVE, GMLLM, RENDER, TritonRepository

SMOKE_GROUP = "group smoke/g0 | 100% of smoke | ctr 1.0%"
SMOKE_PRODUCT = {"id": "smoke-product", "category": "smoke", "title": "Smoke test product", "price": 1.0}
MAX_PROMOTIONS = 20
"""How many promotions ``rollback`` can undo in a row (older ones fall back to ``previous``)."""


@dataclass
class LiveState:
    """Which version serves each group, which routing rollback returns to, and what was refused.

    ``live`` serves every group not in ``groups`` (group -> version); ``promotions``
    lists the promotions ``rollback`` can undo, each with the routing it replaced.
    """

    live: int | None = None
    previous: int | None = None
    good: list[int] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    rolled_back: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)
    promotions: list[dict[str, Any]] = field(default_factory=list)

    def record(self, version: int, event: str, **details: Any) -> None:
        self.events.append({"at": time.time(), "version": version, "event": event, **details})
        del self.events[:-200]

    def routing(self) -> Routing:
        """The routing clients get: ``live`` by default, ``groups`` for the others."""
        return Routing(self.live, dict(self.groups))


def promote_state(state: LiveState, version: int, groups: list[str] | None) -> LiveState:
    """The state once ``version`` went live for ``groups`` (None: for every group; also the first version live).

    >>> s = promote_state(promote_state(LiveState(), 1, ["a"]), 2, ["a", "b"])
    >>> s.live, s.previous, s.groups, s.good
    (1, None, {'a': 2, 'b': 2}, [1, 2])
    >>> s = promote_state(s, 3, None)
    >>> s.live, s.previous, s.groups
    (3, 1, {})
    """
    out = copy.deepcopy(state)
    before = {"live": state.live, "previous": state.previous, "groups": dict(state.groups)}
    if groups is None or state.live is None:
        out.previous, out.live, out.groups = state.live, version, {}
    else:
        out.groups = state.routing().then(version, groups).groups
    if version not in out.good:
        out.good.append(version)
    out.promotions.append({"version": version, "groups": None if groups is None else list(groups), "before": before})
    del out.promotions[:-MAX_PROMOTIONS]
    return out


def rollback_state(state: LiveState) -> tuple[LiveState, int]:
    """The state once the last promotion is undone, and the version undone (now in ``rolled_back``).

    The routing before the last promotion comes back (a group promotion: only
    its groups change). Without a recorded promotion (an old ``live.json``, or
    more than :data:`MAX_PROMOTIONS` rollbacks in a row) ``previous`` becomes
    live for every group.

    >>> s = promote_state(promote_state(promote_state(LiveState(), 1, None), 2, ["a"]), 3, None)
    >>> s, undone = rollback_state(s)
    >>> undone, s.live, s.groups
    (3, 1, {'a': 2})
    >>> s, undone = rollback_state(s)
    >>> undone, s.live, s.groups
    (2, 1, {})
    """
    out = copy.deepcopy(state)
    last = out.promotions[-1] if out.promotions else None
    if last is not None and last["before"].get("live") is not None:
        out.promotions.pop()
        before, undone = last["before"], int(last["version"])
        out.live, out.previous = before["live"], before.get("previous")
        out.groups = {str(g): int(v) for g, v in (before.get("groups") or {}).items()}
    elif last is None and state.live is not None and state.previous is not None:
        undone = state.live
        earlier = [v for v in state.good if v < state.previous and v not in state.rolled_back]
        out.live, out.previous, out.groups = state.previous, (earlier[-1] if earlier else None), {}
    else:
        raise server.ServingError("no previous good version to roll back to; `osmf serve versions` lists them")
    out.rolled_back.append(undone)
    return out, undone


def kept_versions(state: LiveState, policy: str) -> list[int]:
    """The gmllm versions Triton keeps loaded under ``serving.version_policy`` ``policy``: every version that
    serves a group; plus ``previous`` and the routing before the last promotion (so rollback is a switch) unless
    ``latest``; plus every good version under ``all``."""
    wanted: set[int | None] = set(state.routing().versions())
    if policy != "latest":
        wanted.add(state.previous)
        if state.promotions:
            before = state.promotions[-1]["before"]
            wanted |= {before.get("live"), *(before.get("groups") or {}).values()}
    if policy == "all":
        wanted |= set(state.good)
    return sorted(int(v) for v in wanted if v is not None)


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
        kept = kept_versions(state, self.settings.serving.version_policy)
        return sorted({*kept, extra}) if extra is not None else kept

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

    def _switch(self, state: LiveState) -> None:
        """Point ``creative`` at the routing of ``state`` (a reload of the small BLS model)."""
        if state.live is None:
            raise server.ServingError("no live version to point `creative` at; publish a version first")
        self.repository.write_creative_config(state.live, state.groups)
        server.load_model(self.settings, CREATIVE)

    def _groups_of(self, version: int) -> list[str] | None:
        return published_groups(self.repository.published.parent, self.settings.learner.loop.model_name, version)

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
        if not set(kept_versions(state, "live_and_previous")) <= available:
            state.groups = {g: v for g, v in state.groups.items() if v in available}  # a routed version is gone
            state.promotions = []
        if state.live is not None:
            try:
                self._load_gmllm(self._kept(state))
                self._switch(state)
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
        """Promote the next pending version (newer than the live one, not refused, rolled back or live already);
        None if none.

        Pending versions go live in publish order from the newest one published
        for every group (it supersedes the older ones): group versions published
        after it are promoted one per call, none is skipped.
        """
        state = read_state(self.settings)
        repo, model = self.repository.published.parent, self.settings.learner.loop.model_name
        pending = [v for v in published_versions(repo, model)
                   if (state.live is None or v > state.live) and str(v) not in state.refused
                   and v not in state.rolled_back and v not in state.good]
        if not pending:
            return None
        for_all = [i for i, v in enumerate(pending) if self._groups_of(v) is None]
        return self.promote(pending[for_all[-1] if for_all else 0])

    def promote(self, version: int) -> Outcome:
        """Load, smoke-test and make ``version`` live (for its published groups, or for every group); refuse it
        (keeping the current routing serving) on any failure."""
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
            groups = self._groups_of(version)
            state = promote_state(state, version, groups)
            self._switch(state)
            announcement = read_announcement(self.repository.published.parent, self.settings.learner.loop.model_name)
            to_live = None
            if announcement and announcement.get("version") == version and announcement.get("published_at"):
                to_live = max(0.0, time.time() - float(announcement["published_at"]))
            for_groups = {"groups": groups} if groups is not None and state.live != version else {}
            state.record(version, "live", seconds=time.monotonic() - started, publish_to_live_s=to_live, **for_groups)
            write_state(self.settings, state)
            try:
                self._load_gmllm(self._kept(state))  # unload what the policy no longer keeps
            except server.ModelLoadError as exc:
                self.echo(f"version {version} is live; trimming older versions failed: {exc}")
            if for_groups:
                self.echo(f"version {version} is live for groups {', '.join(groups or [])} (default {state.live})")
            else:
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
        """Undo the last promotion (:func:`rollback_state`; a switch of ``creative``); the undone version stays out.

        A version that went live for every group: the routing before it serves
        again. A version that went live for some groups: those groups go back to
        the versions they had, the others are untouched.
        """
        with self._lock:
            started = time.monotonic()
            state = read_state(self.settings)
            after, bad = rollback_state(state)
            needed = after.routing().versions()
            if not set(needed) <= set(server.ready_versions(self.settings, GMLLM)):
                self._load_gmllm(sorted({*needed, *self._kept(state)}))
            self._switch(after)
            seconds = time.monotonic() - started
            moved = sorted(g for g in {*state.groups, *after.groups}
                           if state.routing().version_for(g) != after.routing().version_for(g))
            if after.live != state.live:
                after.record(bad, "rolled_back", to=after.live, groups=after.groups, seconds=seconds)
                reason = f"rolled back from {bad}"
            else:
                back = {g: after.routing().version_for(g) for g in moved}
                after.record(bad, "rolled_back", to=after.live, groups=back, seconds=seconds)
                reason = f"rolled back version {bad} for groups {', '.join(moved) or '(none)'}"
            write_state(self.settings, after)
            return Outcome(after.live or 0, "live", reason, seconds)


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
        routed = sum(1 for v in state.groups.values() if v == version)
        if version == state.live:
            what = "live"
        elif routed:
            what = f"live for {routed} group{'s' if routed > 1 else ''}"
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
