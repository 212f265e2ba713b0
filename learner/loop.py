"""The learner loop: preference pairs in, a new model version out when it is better.

:class:`LearnerLoop` is the state behind ``osmf learner run`` with the Kafka
consumer left out (the command feeds it; tests call it directly):

- a bounded replay buffer (:class:`learner.buffer.PairBuffer`: deduplicated,
  recency-weighted) that :meth:`LearnerLoop.offer` fills; pairs of a product
  the catalogue does not know are skipped and counted;
- the trigger (:meth:`LearnerLoop.due`): ``min_new_pairs`` new pairs, or
  ``max_wait_s`` since the last round with at least one;
- the incumbent: the latest published version, which each round fine-tunes
  and gates against (:meth:`LearnerLoop.train_round`, one
  :func:`learner.round.run_round`); a promoted candidate becomes the incumbent;
  with per-group promotion (``loop.promotion = "group"``) each group's
  incumbent is the version that serves it (:func:`learner.publish.routing`),
  and a round fits and gates each such version on its own groups' pairs;
- the round counter, continued from the history log, so a restarted learner
  numbers on. After a restart the pairs topic is re-read from the start:
  :meth:`LearnerLoop.replayed` then stops counting as new the pairs the last
  logged round already saw.

Group features come from one callable, ``features_for(group_ids)``
(:func:`group_feature_source`: the Feast online store when it is enabled and
applied, else the base run's traffic log); pairs of a group without features
stay in the buffer but are left out of the round, and counted.

>>> from learner.buffer import PairBuffer
>>> def pair(i, product="p1"):
...     return PreferencePair(pair_id=str(i), ts=i, group_id="mugs/g0", category="mugs", product_id=product,
...         winner_creative_id=f"w{i}", loser_creative_id="l", winner_prompt="a", loser_prompt="b",
...         winner_impressions=100, winner_clicks=9, loser_impressions=100, loser_clicks=1,
...         winner_ctr=0.09, loser_ctr=0.01, prob_winner_better=0.99, evidence_level=0)
>>> loop = LearnerLoop(None, 0, {"p1": None}, dict, LearnerSettings(loop={"min_new_pairs": 2}),
...                    Path("/nonexistent"), Path("/nonexistent/rounds.jsonl"), started_at=0.0)
>>> [loop.offer(pair(1)), loop.offer(pair(1)), loop.offer(pair(2, "p9"))]
['new', 'duplicate', 'unknown product']
>>> loop.due(now=1.0), loop.offer(pair(3)), loop.due(now=1.0)
(False, 'new', True)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.settings import LearnerSettings, Settings
from learner.buffer import PairBuffer, TrainingTrigger
from learner.data import ProductRecord
from learner.dpo.onpolicy import lineage_part
from features.group import GroupFeatures
from learner.history import read_rounds
from learner.model.gmllm import GMLLM
from learner.publish import Routing, routing
from learner.round import RoundOutcome, ServedCTR, run_round
from infra.contracts.messages import PreferencePair

log = logging.getLogger(__name__)

FeaturesFor = Callable[[Sequence[str]], Mapping[str, GroupFeatures | str]]
"""``features_for(group_ids)``: features of those groups that have any (unknown groups are left out)."""

JudgeFor = Callable[[Mapping[str, GroupFeatures | str]], ServedCTR | None]
"""Builds a round's ``served_ctr`` judge from the round's group features (e.g. a simulated world)."""

NEW, DUPLICATE, UNKNOWN_PRODUCT = "new", "duplicate", "unknown product"
"""What :meth:`LearnerLoop.offer` did with a pair."""

HISTORY_FILE = "rounds.jsonl"


def history_path(repository: Path, model_name: str) -> Path:
    """Default round log: ``<repo>/<model>/rounds.jsonl`` (beside ``LATEST.json``; not a version directory)."""
    return repository / model_name / HISTORY_FILE


@dataclass
class LoopCounts:
    """What the loop has been offered and left out, since it started."""

    offered: int = 0
    new: int = 0
    duplicates: int = 0
    unknown_product: int = 0
    unknown_product_ids: Counter = field(default_factory=Counter)
    unknown_group: int = 0
    """Pairs left out of the last round because their group has no features."""
    unknown_group_ids: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class RoundSummary:
    """One round as the command reports it (the full record is in the history log)."""

    number: int
    train_pairs: int
    heldout_pairs: int
    groups: int
    steps: int
    seconds: float
    decision: str
    version: int | None
    unknown_group_pairs: int
    outcome: RoundOutcome = field(repr=False, compare=False)
    lineages: tuple[RoundSummary, ...] = field(default=(), repr=False, compare=False)
    """Per-group promotion: one summary per version fitted in this round (this summary adds them up)."""


class LearnerLoop:
    """Buffer, trigger, incumbent and round counter of the learner (see the module docstring).

    Parameters
    ----------
    incumbent, version
        The live model (the latest published version) and its version number.
    products
        The product catalogue: pairs of other products are skipped.
    features_for
        Group features by id (:data:`FeaturesFor`), read at each round.
    settings
        ``settings.loop`` gives trigger, buffer and gate; ``settings.dpo`` the fit.
    repository, history
        Where promoted versions are published, and the round log.
    judge
        Optional :data:`JudgeFor`: simulated CTR per group in the gate.
    one_size
        The one-size-fits-all baseline (pairs pooled under a neutral prefix).
    started_at
        Clock reading (seconds, any monotonic clock) the wait for the first round counts from.
    known_groups
        Groups the learner knows besides those with pairs in a round (e.g. the base run's): their features
        are read too, so a round can protect the ones without pairs (``learner.dpo.preserve``).
    """

    def __init__(
        self,
        incumbent: GMLLM | None,
        version: int | None,
        products: Mapping[str, ProductRecord],
        features_for: FeaturesFor,
        settings: LearnerSettings,
        repository: Path,
        history: Path,
        *,
        judge: JudgeFor | None = None,
        one_size: bool = False,
        started_at: float | None = None,
        known_groups: Sequence[str] = (),
    ) -> None:
        loop = settings.loop
        self.incumbent = incumbent
        self.version = version
        self.products = products
        self.features_for = features_for
        self.settings = settings
        self.repository = repository
        self.history = history
        self.judge = judge
        self.one_size = one_size
        self.known_groups = set(known_groups)
        self.buffer = PairBuffer(loop.buffer_capacity, loop.half_life_s)
        self.trigger = TrainingTrigger(loop.min_new_pairs, loop.max_wait_s)
        self.counts = LoopCounts()
        self.last_round_at = time.monotonic() if started_at is None else started_at
        logged = read_rounds(history)
        self.next_round = 1 + max((int(r.get("round", 0)) for r in logged), default=0)
        self.seen_until = max((int(r.get("data_window", (0, 0))[1]) for r in logged), default=0)
        self.rounds: list[RoundSummary] = []
        found = routing(repository, loop.model_name) if (repository / loop.model_name).is_dir() else Routing()
        self.routing = found if found.default == version else Routing(version, {})
        self.models: dict[int, GMLLM] = {} if incumbent is None or version is None else {version: incumbent}

    def model_for(self, version: int) -> GMLLM:
        """The published ``version``, loaded once."""
        if version not in self.models:
            self.models[version] = GMLLM.load(self.repository / self.settings.loop.model_name / str(version))
        return self.models[version]

    def offer(self, pair: PreferencePair) -> str:
        """Take one pair: :data:`NEW` (kept), :data:`DUPLICATE` (already held) or :data:`UNKNOWN_PRODUCT` (skipped)."""
        self.counts.offered += 1
        if pair.product_id not in self.products:
            self.counts.unknown_product += 1
            self.counts.unknown_product_ids[pair.product_id] += 1
            return UNKNOWN_PRODUCT
        if not self.buffer.add(pair):
            self.counts.duplicates += 1
            return DUPLICATE
        self.counts.new += 1
        return NEW

    def replayed(self) -> int:
        """Call once the topic has been re-read to where it stood at start; returns the pairs still new.

        Pairs no newer than the data window of the last logged round were
        trained on before the restart and stop counting towards the trigger.
        """
        if self.seen_until:
            self.buffer.new_pairs = sum(p.ts > self.seen_until for p in self.buffer.pairs())
        return self.buffer.new_pairs

    def due(self, now: float) -> bool:
        """Whether the trigger fires at clock reading ``now`` (same clock as ``started_at``)."""
        return self.buffer.should_train(self.trigger, now - self.last_round_at)

    def seconds_to_wait(self, now: float) -> float:
        """Seconds until the time trigger fires (it also needs one new pair)."""
        return max(0.0, self.trigger.max_wait_s - (now - self.last_round_at))

    def train_round(
        self, now: float | None = None, on_log: Callable[[int, dict[str, float]], None] | None = None
    ) -> RoundSummary:
        """Run one round on the buffer (fit, gate, publish or keep, log); a promoted candidate becomes the incumbent."""
        if self.incumbent is None:
            raise RuntimeError("no incumbent model: publish a base version first")
        held = self.buffer.pairs()
        with_pairs = {p.group_id for p in held}
        self.known_groups |= with_pairs
        features = dict(self.features_for(sorted(self.known_groups))) if held else {}
        usable = PairBuffer(self.buffer.capacity, self.buffer.half_life_s)
        left_out: Counter = Counter()
        for pair in held:
            if self.one_size or pair.group_id in features:
                usable.add(pair)
            else:
                left_out[pair.group_id] += 1
        self.counts.unknown_group = sum(left_out.values())
        self.counts.unknown_group_ids = left_out
        if left_out:
            log.warning("round %d: %d pairs of %d groups without features left out (%s)", self.next_round,
                        sum(left_out.values()), len(left_out), ", ".join(sorted(left_out)[:5]))
        lineages = self._lineages(usable, features)
        summaries = []
        for version, model, served, pairs, default in lineages:
            judge = self.judge(served) if self.judge is not None else None
            outcome = run_round(
                self.next_round, pairs, model, version, served, self.products, self.settings,
                self.repository, self.history, served_ctr=judge, one_size=self.one_size, on_log=on_log,
                pairs_left_out=left_out, default=default,
            )
            record = outcome.record
            self.seen_until = max(self.seen_until, int(record.data_window[1]))
            if outcome.promoted is not None and record.version is not None:
                self.models[record.version] = outcome.promoted
                self.routing = self.routing.then(record.version, outcome.groups)
                if outcome.groups is None:
                    self.incumbent, self.version = outcome.promoted, record.version
            decision = record.decision
            if outcome.groups is not None:
                decision += f" for {len(outcome.groups)} of {len(served)} groups ({', '.join(outcome.groups)})"
            summaries.append(RoundSummary(
                number=record.round, train_pairs=sum(record.pairs_per_group.values()),
                heldout_pairs=record.heldout_pairs, groups=len(record.pairs_per_group),
                steps=int(record.training.get("steps", 0)), seconds=round(record.finished_at - record.started_at, 1),
                decision=decision if len(lineages) == 1 else f"version {version}: {decision}",
                version=record.version, unknown_group_pairs=sum(left_out.values()), outcome=outcome,
            ))
            self.next_round += 1
        self.models = {v: m for v, m in self.models.items() if v in self.routing.versions()}
        self.buffer.mark_trained()
        self.last_round_at = time.monotonic() if now is None else now
        summary = summaries[0] if len(summaries) == 1 else RoundSummary(
            number=summaries[0].number, train_pairs=sum(x.train_pairs for x in summaries),
            heldout_pairs=sum(x.heldout_pairs for x in summaries), groups=sum(x.groups for x in summaries),
            steps=sum(x.steps for x in summaries), seconds=round(sum(x.seconds for x in summaries), 1),
            decision="; ".join(x.decision for x in summaries), version=self.version,
            unknown_group_pairs=sum(left_out.values()), outcome=summaries[-1].outcome, lineages=tuple(summaries),
        )
        self.rounds.append(summary)
        return summary

    def _lineages(self, usable: PairBuffer, features: Mapping[str, GroupFeatures | str]
                  ) -> list[tuple[int | None, GMLLM, dict[str, GroupFeatures | str], PairBuffer, bool]]:
        """What a round fits: (version, its model, the features of the groups it serves, their pairs, whether it
        is the default) — the incumbent for everything, or with per-group promotion each version that serves a
        group with pairs (per category or per group of it under ``learner.loop.lineage``)."""
        whole = [(self.version, self.incumbent, dict(features), usable, True)]
        if self.settings.loop.promotion != "group" or self.one_size:
            return whole  # type: ignore[return-value]
        out = []
        held = usable.pairs()
        with_pairs = {p.group_id for p in held}
        for version in self.routing.versions():
            served = {g: f for g, f in features.items() if self.routing.version_for(g) == version}
            parts: dict[str, dict[str, GroupFeatures | str]] = {}
            for group in sorted(served):
                parts.setdefault(lineage_part(group, self.settings.loop.lineage), {})[group] = served[group]
            for part in parts.values():
                if not with_pairs & set(part):
                    continue
                pairs = PairBuffer(usable.capacity, usable.half_life_s)
                for pair in held:
                    if pair.group_id in part:
                        pairs.add(pair)
                default = version == self.routing.default and len(part) == len(served)
                out.append((version, self.model_for(version), part, pairs, default))
        return out or whole  # type: ignore[return-value]


def group_feature_source(
    settings: Settings, fallback: Mapping[str, GroupFeatures], reader: object | None = None
) -> tuple[FeaturesFor, str]:
    """``features_for(group_ids)`` and a description of where features come from.

    The Feast online store is tried first when ``settings.features.enabled``
    and the store has been applied; groups it does not know (or every group,
    when it cannot be read) come from ``fallback`` (the base run's
    :func:`features.group.read_group_features`).
    """
    store_read = _store_reader(settings, reader)
    if store_read is None:
        return (lambda ids: {g: fallback[g] for g in ids if g in fallback}), "traffic log of the base run"

    def features_for(group_ids: Sequence[str]) -> dict[str, GroupFeatures | str]:
        ids = list(group_ids)
        try:
            found: dict[str, GroupFeatures | str] = dict(store_read(ids))
        except Exception as exc:  # the store is optional: a failed read falls back, loudly
            log.warning("feature store read failed (%s); using the base run's features", exc)
            found = {}
        for group in ids:
            if group not in found and group in fallback:
                found[group] = fallback[group]
        return found

    return features_for, f"feature store {settings.features.online_store} (fallback: traffic log of the base run)"


def _store_reader(settings: Settings, reader: object | None) -> Callable[[list[str]], Mapping[str, GroupFeatures]] | None:
    """The store's group-feature read, or None when the store is off or has not been applied."""
    if not settings.features.enabled:
        return None
    from features.store import is_applied

    if not is_applied(settings):
        return None
    from features.group import store_group_features

    if reader is None:
        from features.read import FeatureReader

        reader = FeatureReader(settings)
    return lambda ids: store_group_features(reader, ids)  # type: ignore[arg-type]
