"""The learner service: follow the preference-pairs topic, train rounds when due, publish what the gate promotes.

The counterpart of :class:`streams.app.Worker` for the learner; ``osmf learner
run`` only parses its options, builds a :class:`LearnerService` and prints the
:class:`ServiceResult`.

* At every start the pairs topic is re-read from its first offset into the
  replay buffer (it deduplicates, so a restart loses nothing).
* A malformed pair message goes to the dead-letter topic with the reason,
  once: letters already there (same topic, partition, offset) are not sent again.
* SIGINT/SIGTERM stop after the round in progress; a second one aborts it,
  and an aborted round publishes nothing.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.contracts.events import EventError
from infra.contracts.messages import dead_letter_bytes, parse_dead_letter, parse_pair
from infra.kafka import TopicFollower, consume_all, produce_raw
from infra.settings import LearnerSettings, Settings
from learner.data import TrafficError, TrafficLog
from features.group import GroupFeatures, read_group_features
from learner.metrics import loop_state, start_learner_metrics
from learner.loop import NEW, FeaturesFor, JudgeFor, LearnerLoop, group_feature_source
from learner.model.artifact import MANIFEST, ArtifactError, verify_artifact
from learner.model.gmllm import GMLLM
from learner.publish import latest_version, publish_version, routing

MALFORMED_SHOWN = 10
"""Malformed pair messages printed (with the reason) per run; the result counts them all."""

JudgeFactory = Callable[[TrafficLog, FeaturesFor, Callable[[str], None]], JudgeFor]
"""Builds the loop's ``judge_for`` from the catalogue log and the feature source (e.g. a simulated world's CTR)."""


class LearnerServiceError(Exception):
    """The service cannot start: the message names what is missing and how to give it."""


@dataclass(frozen=True)
class ServiceOptions:
    """How long the service runs and what it trains.

    Attributes
    ----------
    once
        Read what the pairs topic holds, run at most one round (if any pair is new), return.
    one_size
        Baseline: one-size-fits-all DPO (neutral prefix, uniform weights).
    max_rounds
        Return after this many rounds (None: until stopped).
    idle_exit_s
        Return after this many seconds without a new pair while no round is due (None: until stopped).
    """

    once: bool = False
    one_size: bool = False
    max_rounds: int | None = None
    idle_exit_s: float | None = None


@dataclass
class ServiceResult:
    """What a run did: exit status, the loop (rounds, counts, live version) and malformed-message counts."""

    code: int
    loop: LearnerLoop
    malformed: int = 0
    dead_lettered: int = 0
    topic: str = ""
    dead_letter_topic: str = ""


@dataclass
class _Stop:
    requested: bool = False
    in_round: bool = False


def pretrain_run_dir(settings: Settings) -> Path:
    """Where ``osmf learner pretrain`` writes its run by default: ``learner.output_dir``, else ``<data_dir>/learner/pretrain``."""
    return settings.learner.output_dir or settings.data_dir / "learner" / "pretrain"


def model_repository(settings: Settings) -> Path:
    """The model repository: ``learner.loop.model_repository``, else ``<data_dir>/models``."""
    return settings.learner.loop.model_repository or settings.data_dir / "models"


def base_paths(settings: Settings, base: Path | None, traffic: Path | None) -> tuple[Path | None, Path | None]:
    """(model artifact directory or None, traffic log directory or None) from ``base`` / ``traffic`` / the defaults."""
    default_run = pretrain_run_dir(settings)
    root = base
    if root is None and (default_run / "model" / MANIFEST).is_file():
        root = default_run
    model = None
    if root is not None:
        if (root / MANIFEST).is_file():
            model = root
        elif (root / "model" / MANIFEST).is_file():
            model = root / "model"
        elif root.is_dir():
            raise ArtifactError(f"--base {root}: neither a model artifact (no {MANIFEST}) nor a pre-training run "
                                "(no model/); give the directory `osmf learner pretrain` wrote")
        else:
            raise ArtifactError(f"--base {root}: no such directory; give a pre-training run or a model artifact")
    if traffic is None and model is not None:
        for candidate in (model.parent / "traffic", model / "traffic"):
            if (candidate / "log.json").is_file():
                traffic = candidate
                break
    if traffic is None and (default_run / "traffic" / "log.json").is_file():
        traffic = default_run / "traffic"
    return model, traffic


def load_incumbent(repo: Path, name: str, base_model: Path | None, echo: Callable[[str], None]) -> tuple[GMLLM, int]:
    """The default published version (the latest one that went live for every group, :func:`learner.publish.routing`),
    loaded; the base model is published as version 1 first when there is none."""
    version = routing(repo, name).default if latest_version(repo, name) is not None else None
    if version is not None:
        gmllm = GMLLM.load(repo / name / str(version))
        note = f" (the base {base_model} is not republished; it only supplies the catalogue)" if base_model else ""
        echo(f"incumbent: version {version} of {repo / name}{note}")
        return gmllm, version
    if base_model is None:
        raise ArtifactError(f"no published version in {repo / name} and no base model to publish as version 1")
    gmllm = GMLLM.load(base_model)
    published = publish_version(base_model, repo, name, verify=verify_artifact,
                                metadata={"round": 0, "initial": True, "source": str(base_model)})
    echo(f"incumbent: version {published.version} of {repo / name}, published from {base_model}")
    return gmllm, published.version


class LearnerService:
    """Follows the pairs topic and runs the :class:`learner.loop.LearnerLoop` on it until stopped.

    Parameters
    ----------
    settings
        The settings (topics, feature store).
    learner
        The learner settings with any overrides applied.
    bootstrap
        Kafka bootstrap address of a broker that answers.
    repo, history
        Model repository and round log.
    base, traffic
        Initial model (published as version 1 when the repository has none) and the catalogue's traffic log.
    options
        :class:`ServiceOptions`.
    judge_factory
        Optional :data:`JudgeFactory` (e.g. simulated CTR in a world) the gate then uses.
    echo
        Prints one line of progress.
    console
        A ``rich`` console for the spinner and malformed-message lines (default: stderr).
    """

    def __init__(
        self,
        settings: Settings,
        learner: LearnerSettings,
        bootstrap: str,
        repo: Path,
        history: Path,
        *,
        base: Path | None = None,
        traffic: Path | None = None,
        options: ServiceOptions = ServiceOptions(),
        judge_factory: JudgeFactory | None = None,
        echo: Callable[[str], None] = print,
        console: Any = None,
    ) -> None:
        from rich.console import Console

        self.settings, self.learner, self.bootstrap = settings, learner, bootstrap
        self.options, self.echo = options, echo
        self.console = console or Console(stderr=True)
        self.topic, self.dead_topic = settings.topics.preference_pairs, settings.topics.dead_letter
        self.loop = self._build_loop(repo, history, base, traffic, judge_factory)
        self._stop = _Stop()
        self._malformed = {"count": 0, "sent": 0, "shown": 0}
        self._already_dead: set[tuple[int, int]] = set()

    def _build_loop(self, repo: Path, history: Path, base: Path | None, traffic: Path | None,
                    judge_factory: JudgeFactory | None) -> LearnerLoop:
        base_model, traffic_dir = base_paths(self.settings, base, traffic)
        name = self.learner.loop.model_name
        if base_model is None and latest_version(repo, name) is None:
            raise LearnerServiceError(
                f"no published version in {repo / name} and no --base; give --base with a pre-training run "
                "(`osmf learner pretrain` writes one) or a model artifact to start from")
        if traffic_dir is None:
            raise LearnerServiceError(
                "no product catalogue; give --traffic with a traffic log directory "
                "(e.g. the traffic/ of `osmf learner pretrain`) or --base with a pre-training run")
        try:
            traffic_log = TrafficLog.load(traffic_dir)
        except TrafficError as exc:
            raise LearnerServiceError(f"--traffic: {exc}") from None
        incumbent, version = load_incumbent(repo, name, base_model, self.echo)
        fallback: Mapping[str, GroupFeatures] = read_group_features(traffic_log)
        features_for, feature_source = group_feature_source(self.settings, fallback)
        self.echo(f"catalogue: {len(traffic_log.products)} products from {traffic_dir}; group features: "
                  f"{feature_source} ({len(fallback)} groups in the traffic log)"
                  + ("; one-size baseline" if self.options.one_size else ""))
        judge = judge_factory(traffic_log, features_for, self.echo) if judge_factory else None
        loop = LearnerLoop(incumbent, version, traffic_log.products, features_for, self.learner, repo, history,
                           judge=judge, one_size=self.options.one_size, known_groups=sorted(fallback))
        if loop.routing.groups:
            self.echo("per-group versions: " + ", ".join(f"{g} on version {v}"
                                                         for g, v in sorted(loop.routing.groups.items())))
        if loop.next_round > 1:
            self.echo(f"history: {loop.next_round - 1} rounds logged in {history}; this run starts at round "
                      f"{loop.next_round}")
        return loop

    # ------------------------------------------------------------------ input

    def _read_dead_letters(self) -> None:
        """Remember which messages of the pairs topic are already on the dead-letter topic."""
        for record in consume_all(self.bootstrap, [self.dead_topic]):
            try:
                letter = parse_dead_letter(record.value)
            except EventError:
                continue
            if letter.source_topic == self.topic:
                self._already_dead.add((letter.partition, letter.offset))

    def _take(self, records: list[Any]) -> int:
        """Offer the records' pairs to the loop; dead-letter malformed ones. Returns how many pairs were new."""
        letters, new = [], 0
        for record in records:
            try:
                pair = parse_pair(record.value)
            except EventError as exc:
                self._dead_letter(record, exc, letters)
                continue
            new += self.loop.offer(pair) == NEW
        if letters:
            self._malformed["sent"] += produce_raw(self.bootstrap, self.dead_topic, letters)
        return new

    def _dead_letter(self, record: Any, exc: EventError, letters: list[tuple[bytes | None, bytes]]) -> None:
        malformed = self._malformed
        malformed["count"] += 1
        if (record.partition, record.offset) in self._already_dead:
            return
        malformed["shown"] += 1
        if malformed["shown"] <= MALFORMED_SHOWN:
            self.console.print(f"malformed pair at {record.topic}[{record.partition}]@{record.offset}: {exc} "
                               f"-> {self.dead_topic}", markup=False, highlight=False, soft_wrap=True)
        letters.append((record.key, dead_letter_bytes(exc, record.value, source_topic=record.topic,
                                                      partition=record.partition, offset=record.offset)))

    # ---------------------------------------------------------------- signals

    def _on_signal(self, signum: int, _frame: Any) -> None:
        stop = self._stop
        if stop.requested and stop.in_round:
            raise KeyboardInterrupt
        stop.requested = True
        if stop.in_round:
            self.console.print("stopping after the round in progress (Ctrl-C again aborts it; an aborted round "
                               "publishes nothing)", soft_wrap=True)

    def stop(self) -> None:
        """Ask the service to stop after the round in progress (what SIGINT/SIGTERM do)."""
        self._stop.requested = True

    # ------------------------------------------------------------------ rounds

    def _round(self) -> None:
        loop = self.loop
        self._stop.in_round = True
        with self.console.status(f"round {loop.next_round}: training on {len(loop.buffer)} pairs") as spinner:
            def on_log(step: int, figures: dict[str, float]) -> None:
                spinner.update(f"round {loop.next_round}: step {step}, loss {figures.get('loss', float('nan')):.3f}")

            summary = loop.train_round(on_log=on_log)
        self._stop.in_round = False
        left = f"; {summary.unknown_group_pairs} pairs of groups without features left out" \
            if summary.unknown_group_pairs else ""
        self.echo(f"round {summary.number}: {summary.train_pairs} train + {summary.heldout_pairs} held-out pairs "
                  f"in {summary.groups} groups, {summary.steps} steps, {summary.seconds:.1f} s -> "
                  f"{summary.decision}; live version {loop.version}{left}")

    def run(self) -> ServiceResult:
        """Follow the topic until stopped (or until ``options`` say so); never raises on Ctrl-C."""
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (embedded in another program): no handlers
                pass
        code = 0
        try:
            self._read_dead_letters()
            start_learner_metrics(self.learner.metrics_port, self.loop.history, self.loop.repository,
                                  self.learner.loop.model_name, state=lambda: loop_state(self.loop),
                                  host=self.learner.metrics_host)
            self._follow()
        except KeyboardInterrupt:
            self._stop.in_round = False
            self.console.print(f"round {self.loop.next_round} aborted: nothing was published; live version "
                               f"{self.loop.version}", soft_wrap=True)
            code = 130
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return ServiceResult(code, self.loop, self._malformed["count"], self._malformed["sent"], self.topic,
                             self.dead_topic)

    def _follow(self) -> None:
        loop, options, stop = self.loop, self.options, self._stop
        self.echo(f"reading {self.topic} from the beginning at {self.bootstrap}")
        with TopicFollower(self.bootstrap, [self.topic]) as follower:
            replaying, idle_since = True, time.monotonic()
            with self.console.status("reading the pairs topic") as spinner:
                while not stop.requested:
                    if self._take(follower.poll(timeout_s=0.5)):
                        idle_since = time.monotonic()
                    if replaying:
                        if not follower.caught_up:
                            continue
                        replaying = False
                        still_new = loop.replayed()
                        c = loop.counts
                        self.echo(f"read {c.offered} pairs from {self.topic} ({c.duplicates} duplicates, "
                                  f"{self._malformed['count']} malformed, {c.unknown_product} of unknown products); "
                                  f"{len(loop.buffer)} in the buffer, {still_new} new since the last round")
                        if options.once:
                            break
                    now = time.monotonic()
                    if loop.due(now):
                        spinner.stop()
                        self._round()
                        spinner.start()
                        idle_since = time.monotonic()
                        if options.max_rounds is not None and len(loop.rounds) >= options.max_rounds:
                            break
                    elif options.idle_exit_s is not None and now - idle_since >= options.idle_exit_s:
                        self.echo(f"no new pair for {options.idle_exit_s:g} s; exiting")
                        break
                    spinner.update(f"waiting: {loop.buffer.new_pairs}/{loop.trigger.min_new_pairs} new pairs, "
                                   f"or one and {loop.seconds_to_wait(now):.0f} s")
        if options.once and not stop.requested:
            if loop.buffer.new_pairs > 0:
                self._round()
            else:
                self.echo("no new pairs; no round run")


__all__ = [
    "LearnerService",
    "LearnerServiceError",
    "ServiceOptions",
    "ServiceResult",
    "base_paths",
    "load_incumbent",
    "model_repository",
    "pretrain_run_dir",
]
