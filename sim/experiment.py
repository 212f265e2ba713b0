"""The online experiment: one simulated traffic stream split across arms by user hash (issue 13, part 3).

``osmf experiment --world FILE --arms base,one-size,group-dpo --minutes M --seed S``

1. A base G-MLLM is pre-trained on the world's simulated log (cached under
   ``<data_dir>/experiments/bases/<key>``, keyed by world file and settings);
   the log's grouper assigns every user its group per category (frozen).
2. :func:`sim.simulate.generate_events` makes ``M`` simulated minutes of
   traffic at ``rate`` impressions/s. Each user belongs to one arm
   (:func:`arm_of`: a hash of the user id), so every arm sees the same kind
   of traffic. Each arm has its own live model, served version and counts:

   - ``base``: the base, never retrained, group prefixes;
   - ``one-size``: one target per category (the category's features as
     prefix), uniform pair weights, pairs pooled;
   - ``group-dpo``: one target per learned group, inverse-share weights,
     groups without pairs protected by mirrored pairs.

   For each impression the arm's slate for (target, product) — ``K``
   creatives sampled from its live model (:func:`learner.dpo.onpolicy.sample_slates`)
   — is served by Thompson sampling on the arm's own clicks/impressions.
3. Every ``round_every_min`` simulated minutes each retrained arm mines pairs
   from its own served traffic since its version went live
   (:func:`learner.dpo.onpolicy.mine_slate_pairs`: the stream worker's
   :class:`streams.pairs.PairMiner`), fits Group-DPO from its live model,
   gates the candidate (simulated CTR on products ``[P, 2P)``,
   :class:`sim.judge.WorldCTR`) and, if promoted, serves the new version
   (new slates) from ``boundary + the round's wall seconds`` on: training
   time counts as simulated time, so "evidence → live" is honest.
   With ``learner.loop.promotion = "group"`` each arm keeps a live model and
   version per target: a round fits each *lineage* (the targets one live
   model serves) from that model on its own targets' pairs, gates it on
   their groups only (:meth:`sim.judge.WorldCTR.restricted`) and puts it live
   for the targets that pass (:func:`learner.gate.passing_units`); the others
   keep their model, slates and counts. An impression's ``model_version``
   names the version serving its target.
4. Every arm's click stream runs through :class:`streams.drift.DriftMonitor`
   per group; with ``shifts:`` in the world the report names the alerts and
   which groups' top creatives changed after the first alert.

The result (:func:`run_experiment`) is a JSON-ready dict; :func:`write_report`
writes ``experiment.json`` and the PNG plots.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infra.contracts.events import Click, Impression
from infra.contracts.messages import PreferencePair
from infra.contracts.prompt import parse_prompt
from infra.settings import QUICK_MODEL, LearnerSettings
from learner.dpo.data import category_features
from learner.dpo.onpolicy import lineages, mine_slate_pairs, sample_slates, target_groups
from learner.dpo.train import fit_with_protection
from learner.gate import GroupFigures, decide, passing_units
from learner.model.gmllm import GMLLM
from learner.round import gate_config, judged
from sim.judge import WorldCTR, group_members
from sim.schema import WorldError
from sim.simulate import DEFAULT_START_TS_MS, Shown, creative_id, generate_events
from sim.world import Product, User, World
from streams.ctr import CreativeStats
from streams.drift import DriftConfig, DriftMonitor
from streams.pairs import PairMinerConfig

ARMS = ("base", "one-size", "group-dpo")
DEFAULT_LEARNER: dict[str, Any] = {
    "model": QUICK_MODEL,
    "pretrain": {"impressions": 60_000, "creatives_per_product": 8, "steps": 80, "batch_size": 8,
                 "warmup_steps": 10, "feature_snapshots": 2},
    "generation": {"candidates": 4},
    "dpo": {"max_steps": 40, "batch_size": 8},
    "loop": {"ctr_products_per_group": 2, "onpolicy_candidates": 4},
}
"""The default experiment learner: the quick model of the benchmarks (the 1.1 M default pre-trains ~10 min)."""
QUICKER_LEARNER: dict[str, Any] = {
    "model": QUICK_MODEL,
    "pretrain": {"impressions": 20_000, "creatives_per_product": 6, "steps": 30, "batch_size": 8,
                 "warmup_steps": 5, "feature_snapshots": 1},
    "generation": {"candidates": 2},
    "dpo": {"max_steps": 10, "batch_size": 8},
    "loop": {"ctr_products_per_group": 1, "onpolicy_candidates": 3},
}
"""``--quick``: a smaller pre-training and fits (tests)."""


class ExperimentError(ValueError):
    """A bad experiment request (arms, durations); the message is one line with the fix."""


@dataclass(frozen=True)
class ExperimentOptions:
    """What to run: world, arms, simulated minutes, seed, traffic rate (impressions/s of simulated time),
    minutes between rounds, the miner's ``min_impressions``, quick sizes, learner overrides."""

    world_file: Path
    arms: tuple[str, ...] = ARMS
    minutes: float = 6.0
    seed: int = 0
    rate: float = 300.0
    round_every_min: float = 1.5
    min_impressions: int = 60
    quick: bool = False
    learner: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: Path = Path("data/experiments/bases")


def parse_arms(text: str) -> tuple[str, ...]:
    """``"base,one-size,group-dpo"`` -> the arms, validated (one-line error otherwise)."""
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in arms if a not in ARMS]
    if not arms or bad or len(set(arms)) != len(arms):
        what = f"unknown arm(s) {', '.join(bad)}" if bad else "empty or repeated arms"
        raise ExperimentError(f"--arms {text!r}: {what}; give a comma list of distinct arms from {','.join(ARMS)}")
    return arms


def arm_of(user_id: str, arms: tuple[str, ...], seed: int) -> str:
    """The arm of a user: a stable hash of the user id (and seed), so each user sees one arm only."""
    digest = hashlib.blake2b(f"{seed}:{user_id}".encode(), digest_size=8).digest()
    return arms[int.from_bytes(digest, "big") % len(arms)]


def wilson(clicks: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a binomial rate."""
    if n <= 0:
        return (0.0, 1.0)
    p = clicks / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class _Move:
    """A gated candidate going live for ``targets`` (every target under model-level promotion) as ``version``,
    with its slates; ``figures`` (the round's, or its lineage's) get the live time."""

    model: GMLLM
    targets: list[str]
    slates: dict[tuple[str, str], list[str]]
    version: int
    evidence_ts: int
    figures: dict[str, Any]


@dataclass
class _Pending:
    """A round's promotions, live from ``live_ts`` (the round's boundary plus its wall time) on."""

    live_ts: int
    figures: dict[str, Any]
    moves: list[_Move]


@dataclass
class _ArmState:
    name: str
    model: GMLLM
    targets: dict[str, Any]
    members: dict[str, Counter]
    one_size: bool
    retrain: bool
    per_target: bool = False
    """``learner.loop.promotion = "group"``: a live model and version per target (``live``, ``target_version``)."""
    version: int = 0
    """The newest version put live (per target: the arm's version counter)."""
    live: dict[str, GMLLM] = field(default_factory=dict)
    """Per target: its live model when it is not ``model``."""
    target_version: dict[str, int] = field(default_factory=dict)
    """Per target: the version serving it (empty under model-level promotion: ``version`` serves all)."""
    slates: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    counts: dict[tuple[str, str], dict[str, list[int]]] = field(default_factory=dict)
    last_ts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    pending: _Pending | None = None
    gate_figures: dict[str, GroupFigures] | None = None
    """The live model's figures by the gate's judge (computed once per live model; per target: per group, of
    the model serving it)."""
    version_impressions: Counter = field(default_factory=Counter)
    """Impressions per served version label."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    group_counts: dict[str, list[int]] = field(default_factory=dict)
    bins: dict[int, list[int]] = field(default_factory=dict)
    users: set[str] = field(default_factory=set)
    monitor: DriftMonitor | None = None
    alerts: list[dict[str, Any]] = field(default_factory=list)
    top_at_alert: dict[tuple[str, str], str] | None = None

    def target_of(self, group: str) -> str:
        return f"{group.split('/', 1)[0]}/all" if self.one_size else group

    def live_model(self, target: str) -> GMLLM:
        """The model serving ``target``."""
        return self.live.get(target, self.model)

    def label(self, target: str) -> str:
        """The version label of the impressions served to ``target`` (``<arm>-v<n>``)."""
        return f"{self.name}-v{self.target_version.get(target, self.version)}"

    def lineages(self, split: str = "version") -> list[tuple[GMLLM, list[str]]]:
        """The targets grouped by the live model serving them, in target order (``split``:
        :func:`learner.dpo.onpolicy.lineages`)."""
        return lineages(self.targets, self.live_model, split)

    def top(self) -> dict[tuple[str, str], str]:
        """The creative each slate serves most (highest posterior mean) per (target, product)."""
        out = {}
        for key, prompts in self.slates.items():
            counts = self.counts.get(key, {})
            out[key] = max(prompts, key=lambda p: (counts.get(p, [0, 0])[1] + 1) / (counts.get(p, [0, 0])[0] + 2))
        return out


def run_experiment(options: ExperimentOptions, echo: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the experiment (module docstring); returns the report (JSON-ready)."""
    from learner.pretrain import torch_threads

    if options.minutes <= 0 or options.rate <= 0 or options.round_every_min <= 0:
        raise ExperimentError("--minutes, --rate and --round-every must be positive")
    base_overrides = QUICKER_LEARNER if options.quick else DEFAULT_LEARNER
    settings = LearnerSettings(**_merge(base_overrides, dict(options.learner)))
    world = World.load(options.world_file)
    with torch_threads(settings.threads):
        return _run(options, settings, world, echo)


def _base(options: ExperimentOptions, settings: LearnerSettings, world: World,
          echo: Callable[[str], None]) -> tuple[GMLLM, Any, Any, Any]:
    from features.group import read_group_features
    from learner.pretrain import pretrain
    from sim.logs import traffic_from_world

    p = settings.pretrain
    blob = json.dumps([settings.model.model_dump(mode="json"), p.model_dump(mode="json")], sort_keys=True).encode()
    key = hashlib.sha256(options.world_file.read_bytes() + blob).hexdigest()[:12]
    cache = options.cache_dir / f"base-{key}"
    echo(f"simulating the pre-training log: {p.impressions:,} impressions of random creatives")
    train_log, grouper = traffic_from_world(world, n_impressions=p.impressions, seed=p.traffic_seed,
                                            creatives_per_product=p.creatives_per_product)
    if (cache / "manifest.json").is_file():
        echo(f"reusing the pre-trained base {cache}")
        return GMLLM.load(cache), read_group_features(train_log), train_log, grouper
    echo(f"pre-training the base ({p.steps} steps)")
    base, data, _ = pretrain(train_log, settings)
    base.save(cache)
    return base, data.features, train_log, grouper


def _run(options: ExperimentOptions, settings: LearnerSettings, world: World,
         echo: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    base, features, train_log, grouper = _base(options, settings, world, echo)
    base_s = time.perf_counter() - started
    products = train_log.products
    members = group_members(world, grouper)
    loop = settings.loop
    groups = sorted(g for g in features if members.get(g))
    if not groups:
        raise WorldError(f"{options.world_file}: the pre-training log produced no group with members")
    user_group = {(u.id, c): grouper.assign(c, dict(u.attributes)) for u in world.users for c in world.categories}
    one_size_features = category_features(train_log)
    one_members: dict[str, Counter] = {}
    for g in groups:
        one_members.setdefault(f"{g.split('/', 1)[0]}/all", Counter()).update(members[g])
    judge = WorldCTR(world, members, {g: features[g] for g in groups}, products, settings.generation,
                     loop.ctr_products_per_group)
    oracle = judge.oracle_ctr(40 if options.quick else 200)

    arms: dict[str, _ArmState] = {}
    gate_judges: dict[str, WorldCTR] = {}
    for name in options.arms:
        one = name == "one-size"
        targets = {c: one_size_features[c] for c in one_members} if one else {g: features[g] for g in groups}
        arm = _ArmState(name, base, targets, one_members if one else {g: members[g] for g in groups}, one,
                        retrain=name != "base", per_target=loop.promotion == "group",
                        monitor=DriftMonitor(DriftConfig(min_observations=500, cooldown_ms=120_000)))
        if arm.per_target:
            arm.target_version = dict.fromkeys(targets, 0)
        serve = {g: one_size_features[f"{g.split('/', 1)[0]}/all"] for g in groups} if one else judge.features
        gate_judges[name] = WorldCTR(world, members, serve, products, settings.generation,
                                     loop.ctr_products_per_group, first_product=loop.ctr_products_per_group,
                                     draws=loop.ctr_draws_per_product, serve=loop.ctr_served)
        arm.slates = _slates(arm, arm.model, world, products, settings, options.seed, 0)
        arm.versions.append({"version": f"{name}-v0", "live_ts_s": 0.0, "round": 0}
                            | ({"targets": sorted(targets)} if arm.per_target else {}))
        arms[name] = arm
    echo(f"{len(groups)} groups, arms {', '.join(arms)}; slates sampled ({time.perf_counter() - started:.0f} s)")

    rate, seed = options.rate, options.seed
    count = round(options.minutes * 60 * rate)
    round_every = max(1, round(options.round_every_min * 60 * rate))
    miner = PairMinerConfig(min_impressions=options.min_impressions)
    rng = random.Random(f"thompson:{seed}")
    index = [0]

    def ts_of(i: int) -> int:
        return DEFAULT_START_TS_MS + math.floor(i * 1000 / rate)

    def choose(user: User, product: Product) -> Shown:
        i = index[0]
        index[0] += 1
        ts = ts_of(i)
        arm = arms[arm_of(user.id, tuple(arms), seed)]
        if arm.pending is not None and ts >= arm.pending.live_ts:
            _go_live(arm, arm.pending, ts)
            arm.pending = None
        group = user_group[(user.id, product.category)]
        key = (arm.target_of(group), product.id)
        prompts = arm.slates.get(key)
        if not prompts:
            prompts = arm.slates.setdefault(key, _fallback(arm, key, products, settings, seed))
        counts = arm.counts.setdefault(key, {})
        draw = [rng.betavariate(1 + counts.get(p, [0, 0])[1], 1 + counts.get(p, [0, 0])[0] - counts.get(p, [0, 0])[1])
                for p in prompts]
        text = prompts[int(np.argmax(draw))]
        prompt = parse_prompt(text)
        return Shown(creative_id(product.id, prompt), prompt, arm.label(key[0]), group)

    def run_rounds(boundary_i: int) -> None:
        boundary_ts = ts_of(boundary_i)
        for arm in arms.values():
            if arm.retrain and arm.pending is None:
                fit_round = _group_round if arm.per_target else _round
                fit_round(arm, boundary_ts, world, products, settings, miner, gate_judges[arm.name], seed, echo)

    last: tuple[Impression, _ArmState, str] | None = None

    def settle(clicked: bool) -> None:
        impression, arm, group = last  # type: ignore[misc]
        key = (arm.target_of(group), impression.product_id)
        c = arm.counts.setdefault(key, {}).setdefault(impression.prompt, [0, 0])
        c[0] += 1
        c[1] += int(clicked)
        arm.last_ts[(key[0], key[1], impression.prompt)] = impression.ts
        arm.version_impressions[impression.model_version] += 1
        g = arm.group_counts.setdefault(group, [0, 0])
        g[0] += 1
        g[1] += int(clicked)
        b = arm.bins.setdefault((impression.ts - DEFAULT_START_TS_MS) // 30_000, [0, 0])
        b[0] += 1
        b[1] += int(clicked)
        arm.users.add(impression.user_id)
        alert = arm.monitor.update(group, impression.category, clicked, impression.ts)  # type: ignore[union-attr]
        if alert is not None:
            arm.alerts.append({"group": alert.group_id, "ts_s": (impression.ts - DEFAULT_START_TS_MS) / 1000,
                               "ctr_before": alert.ctr_before, "ctr_after": alert.ctr_after})
            if arm.top_at_alert is None:
                arm.top_at_alert = arm.top()

    seen = 0
    traffic_started = time.perf_counter()
    for event in generate_events(world, seed, n_impressions=count, rate=rate, chooser=choose):
        if isinstance(event, Click):
            settle(True)
            last = None
            continue
        if last is not None:
            settle(False)
        group = event.group_id or ""
        last = (event, arms[arm_of(event.user_id, tuple(arms), seed)], group)
        seen += 1
        if seen % round_every == 0 and seen < count:
            run_rounds(seen)
    if last is not None:
        settle(False)
    traffic_s = time.perf_counter() - traffic_started
    return _report(options, world, arms, groups, members, oracle, settings, count, base_s,
                   time.perf_counter() - started, traffic_s, user_group)


def _slates(arm: _ArmState, model: GMLLM, world: World, products: Mapping[str, Any], settings: LearnerSettings,
            seed: int, version: int, targets: Iterable[str] | None = None) -> dict[tuple[str, str], list[str]]:
    """``model``'s slates for ``targets`` (default: every target of the arm) on every known product of theirs."""
    served = {t: arm.targets[t] for t in (arm.targets if targets is None else targets)}
    shown = {t: [products[p.id] for p in world.products.get(t.split("/", 1)[0], []) if p.id in products]
             for t in served}
    return sample_slates(model, served, shown, settings.loop.onpolicy_candidates,
                         temperature=settings.loop.onpolicy_temperature, seed=seed * 1_000 + version,
                         max_new_tokens=settings.generation.max_new_tokens)


def _fallback(arm: _ArmState, key: tuple[str, str], products: Mapping[str, Any], settings: LearnerSettings,
              seed: int) -> list[str]:
    """A slate for a (target, product) the live model had none for (unknown product or no valid sample)."""
    from infra.contracts.prompt import random_prompt

    target, product = key
    if product in products and target in arm.targets:
        got = sample_slates(arm.live_model(target), {target: arm.targets[target]}, {target: [products[product]]},
                            settings.loop.onpolicy_candidates, seed=seed, max_new_tokens=settings.generation.max_new_tokens)
        if got:
            return got[key]
    return [random_prompt(random.Random(f"{seed}:{target}:{product}")).to_text()]


def _go_live(arm: _ArmState, pending: _Pending, ts: int) -> None:
    """Put a round's promotions live at the first impression at ``ts`` >= ``pending.live_ts``: new model, slates
    and version for the targets each went live for, their counts restarted (all of them per model)."""
    live_s = (pending.live_ts - DEFAULT_START_TS_MS) / 1000
    for move in pending.moves:
        arm.version = move.version
        if arm.per_target:
            moved = set(move.targets)
            arm.live.update(dict.fromkeys(moved, move.model))
            arm.target_version.update(dict.fromkeys(moved, move.version))
            arm.slates = {k: v for k, v in arm.slates.items() if k[0] not in moved} | move.slates
            arm.counts = {k: v for k, v in arm.counts.items() if k[0] not in moved}
        else:
            arm.model, arm.slates, arm.counts = move.model, move.slates, {}
        move.figures["live_ts_s"] = live_s
        move.figures["evidence_to_live_s"] = round((ts - move.evidence_ts) / 1000, 1)
        arm.versions.append({"version": f"{arm.name}-v{move.version}", "live_ts_s": live_s,
                             "round": pending.figures["round"]}
                            | ({"targets": move.targets} if arm.per_target else {}))
    pending.figures["live_ts_s"] = live_s
    pending.figures["evidence_to_live_s"] = round((ts - max(m.evidence_ts for m in pending.moves)) / 1000, 1)


def _mined(arm: _ArmState, products: Mapping[str, Any], miner: PairMinerConfig, number: int) -> list[PreferencePair]:
    """Pairs among each slate's creatives, on the arm's counts since each target's version went live."""
    stats = {key: {p: CreativeStats(c[0], c[1]) for p, c in creatives.items()}
             for key, creatives in arm.counts.items()}
    categories = {pid: record.category for pid, record in products.items()}
    return mine_slate_pairs(stats, categories, miner, ts=number)


def _evidence(arm: _ArmState, pairs: list[PreferencePair]) -> int:
    """The time of the newest impression behind ``pairs``."""
    return max(arm.last_ts.get((p.group_id, p.product_id, t), 0) for p in pairs for t in (p.winner_prompt, p.loser_prompt))


def _dpo(arm: _ArmState, settings: LearnerSettings, seed: int) -> Any:
    """The fit's DPO settings: the run's seed, uniform pair weights for one-size."""
    update: dict[str, Any] = {"seed": settings.dpo.seed + seed}
    if arm.one_size:
        update["group_weighting"] = "uniform"
    return settings.dpo.model_copy(update=update)


def _round(arm: _ArmState, boundary_ts: int, world: World, products: Mapping[str, Any], settings: LearnerSettings,
           miner: PairMinerConfig, gate_judge: WorldCTR, seed: int, echo: Callable[[str], None]) -> None:
    """A model-level round: fit from the live model on every pair, gate on every group, all or nothing."""
    number = len(arm.rounds) + 1
    wall = time.perf_counter()
    pairs = _mined(arm, products, miner, number)
    figures: dict[str, Any] = {"round": number, "at_s": (boundary_ts - DEFAULT_START_TS_MS) / 1000,
                               "from_version": f"{arm.name}-v{arm.version}", "pairs": len(pairs),
                               "pairs_per_group": dict(sorted(Counter(p.group_id for p in pairs).items()))}
    arm.rounds.append(figures)
    if not pairs:
        figures.update(promoted=False, reason="no pair mined", wall_s=round(time.perf_counter() - wall, 1))
        echo(f"{arm.name} round {number} at {figures['at_s']:.0f} s: no pair mined")
        return
    evidence = _evidence(arm, pairs)
    candidate, fit, held = fit_with_protection(arm.model, pairs, arm.targets, products, settings,
                                               seed * 1_000 + number, arm.one_size, _dpo(arm, settings, seed))
    mirrored = held.mirrored
    if arm.gate_figures is None:
        arm.gate_figures = judged(gate_judge, arm.model)
    new_figures = judged(gate_judge, candidate)
    decision = decide(new_figures, arm.gate_figures, gate_config(settings))
    figures.update(mirrored=len(mirrored), anchors=fit.anchors, steps=fit.steps, promoted=decision.promote, reason=decision.reason,
                   gate_mean=(round(decision.overall_incumbent, 5), round(decision.overall_candidate, 5)),
                   evidence_ts=evidence, evidence_at_s=(evidence - DEFAULT_START_TS_MS) / 1000)
    if decision.promote:
        arm.gate_figures = new_figures
        slates = _slates(arm, candidate, world, products, settings, seed, arm.version + 1)
        wall_s = time.perf_counter() - wall
        live_ts = boundary_ts + math.ceil(wall_s * 1000)  # the round's wall time counts as simulated time
        move = _Move(candidate, sorted(arm.targets), slates, arm.version + 1, evidence, figures)
        arm.pending = _Pending(live_ts, figures, [move])
    wall_s = time.perf_counter() - wall
    figures["wall_s"] = round(wall_s, 1)
    echo(f"{arm.name} round {number} at {figures['at_s']:.0f} s: {len(pairs)} pairs ({len(mirrored)} mirrored), "
         f"{'promoted' if decision.promote else 'kept: ' + decision.reason} ({wall_s:.0f} s wall)")


def _group_round(arm: _ArmState, boundary_ts: int, world: World, products: Mapping[str, Any],
                 settings: LearnerSettings, miner: PairMinerConfig, gate_judge: WorldCTR, seed: int,
                 echo: Callable[[str], None]) -> None:
    """A per-target round (``learner.loop.promotion = "group"``): each lineage (the targets one live model
    serves) with pairs is fitted from its model on its targets' pairs and gated per target
    (:func:`_lineage_round`); the candidates go live together for the targets that passed."""
    number = len(arm.rounds) + 1
    wall = time.perf_counter()
    pairs = _mined(arm, products, miner, number)
    lineages: list[dict[str, Any]] = []
    figures: dict[str, Any] = {"round": number, "at_s": (boundary_ts - DEFAULT_START_TS_MS) / 1000,
                               "from_versions": {t: arm.label(t) for t in sorted(arm.targets)}, "pairs": len(pairs),
                               "pairs_per_group": dict(sorted(Counter(p.group_id for p in pairs).items())),
                               "lineages": lineages}
    arm.rounds.append(figures)
    moves: list[_Move] = []
    for model, targets in arm.lineages(settings.loop.lineage):
        mine = [p for p in pairs if p.group_id in targets]
        lineage: dict[str, Any] = {"targets": targets, "from_version": arm.label(targets[0]), "pairs": len(mine)}
        lineages.append(lineage)
        if not mine:
            lineage.update(promoted_targets=[], reason="no pair mined")
            continue
        move = _lineage_round(arm, model, targets, mine, lineage, world, products, settings, gate_judge, seed,
                              number, arm.version + len(moves) + 1)
        if move is not None:
            moves.append(move)
    promoted = sorted(t for m in moves for t in m.targets)
    figures.update(promoted=bool(promoted), promoted_targets=promoted,
                   reason="; ".join(f"{'+'.join(x['targets'])}: {x['reason']}" for x in lineages))
    if moves:
        evidence = max(m.evidence_ts for m in moves)
        figures.update(evidence_ts=evidence, evidence_at_s=(evidence - DEFAULT_START_TS_MS) / 1000)
        live_ts = boundary_ts + math.ceil((time.perf_counter() - wall) * 1000)  # wall time counts as simulated
        arm.pending = _Pending(live_ts, figures, moves)
    wall_s = time.perf_counter() - wall
    figures["wall_s"] = round(wall_s, 1)
    echo(f"{arm.name} round {number} at {figures['at_s']:.0f} s: {len(pairs)} pairs, {len(lineages)} lineage(s), "
         f"live for {', '.join(promoted) if promoted else 'no target'} ({wall_s:.0f} s wall)")


def _lineage_round(arm: _ArmState, model: GMLLM, targets: list[str], pairs: list[PreferencePair],
                   figures: dict[str, Any], world: World, products: Mapping[str, Any], settings: LearnerSettings,
                   gate_judge: WorldCTR, seed: int, number: int, version: int) -> _Move | None:
    """Fit ``model`` on its ``targets``' ``pairs`` (protection for those targets only), gate it on their groups
    by the gate judge restricted to them (the incumbent's figures cached per group in ``arm.gate_figures``);
    the move of the targets that pass (:func:`learner.gate.passing_units`), or None."""
    served = {t: arm.targets[t] for t in targets}
    candidate, fit, held = fit_with_protection(model, pairs, served, products, settings, seed * 1_000 + number,
                                               arm.one_size, _dpo(arm, settings, seed))
    groups = [g for t in targets for g in target_groups(t, gate_judge.groups())]
    judge = gate_judge.restricted(groups)
    known = arm.gate_figures or {}
    incumbent = {g: known[g] for g in groups} if all(g in known for g in groups) else judged(judge, model)
    new = judged(judge, candidate)
    config = gate_config(settings)
    whole = decide(new, incumbent, config)
    moved = passing_units(new, incumbent, {t: target_groups(t, groups) for t in targets}, config)
    moved_groups = {g for t in moved for g in target_groups(t, groups) if g in new}
    arm.gate_figures = {**known, **incumbent, **{g: new[g] for g in moved_groups}}
    evidence = _evidence(arm, pairs)
    partial = moved and len(moved) < len(targets)
    figures.update(mirrored=len(held.mirrored), anchors=fit.anchors, steps=fit.steps, promoted_targets=moved,
                   reason=f"live for {', '.join(moved)} only; {whole.reason}" if partial else whole.reason,
                   gate_mean=(round(whole.overall_incumbent, 5), round(whole.overall_candidate, 5)),
                   evidence_at_s=(evidence - DEFAULT_START_TS_MS) / 1000)
    if not moved:
        return None
    figures["version"] = f"{arm.name}-v{version}"
    slates = _slates(arm, candidate, world, products, settings, seed, version, moved)
    return _Move(candidate, moved, slates, version, evidence, figures)


def _report(options: ExperimentOptions, world: World, arms: Mapping[str, _ArmState], groups: list[str],
            members: Mapping[str, Counter], oracle: Mapping[str, float], settings: LearnerSettings, count: int,
            base_s: float, total_s: float, traffic_s: float, user_group: Mapping[tuple[str, str], str]) -> dict[str, Any]:
    shifts = [{"segment": f"{c}/{s.name}", "at_s": sh.at_s}
              for c in world.categories for s in _segments(world, c) for sh in s.shifts]
    shifted_segments = {s["segment"] for s in shifts}
    # learned groups whose members are mostly of a shifted segment
    shifted_groups = sorted(g for g in groups if members[g] and
                            members[g].most_common(1)[0][0] in shifted_segments)
    out_arms: dict[str, Any] = {}
    for name, arm in arms.items():
        per_group = {}
        for g in groups:
            n, c = arm.group_counts.get(g, [0, 0])
            lo, hi = wilson(c, n)
            per_group[g] = {"impressions": n, "clicks": c, "ctr": c / n if n else None, "ci95": [lo, hi]}
        judged = {g: v for g, v in per_group.items() if v["impressions"]}
        worst = min(judged, key=lambda g: judged[g]["ctr"]) if judged else None
        n_all = sum(v["impressions"] for v in per_group.values())
        c_all = sum(v["clicks"] for v in per_group.values())
        times = [[k * 30, v[0], v[1]] for k, v in sorted(arm.bins.items())]
        changed = None
        if arm.top_at_alert is not None:
            now = arm.top()
            changed = sorted({k[0] for k, v in now.items() if arm.top_at_alert.get(k) not in (None, v)})
        alerted = sorted({a["group"] for a in arm.alerts})
        out_arms[name] = {
            "users": len(arm.users), "impressions": n_all, "clicks": c_all,
            "ctr": c_all / n_all if n_all else None, "ci95": list(wilson(c_all, n_all)),
            "per_group": per_group,
            "worst_group": worst, "worst_ctr": judged[worst]["ctr"] if worst else None,
            "worst_ci95": judged[worst]["ci95"] if worst else None,
            "ctr_over_time": times, "versions": arm.versions, "rounds": [
                {k: v for k, v in r.items() if k != "evidence_ts"} for r in arm.rounds],
            "promoted": sum(1 for r in arm.rounds if r.get("promoted")),
            "live_versions": {t: arm.label(t) for t in sorted(arm.targets)},
            "version_impressions": dict(sorted(arm.version_impressions.items())),
            "evidence_to_live_s": [r["evidence_to_live_s"] for r in arm.rounds if "evidence_to_live_s" in r],
            "drift_alerts": arm.alerts,
            "targets_changed_after_first_alert": changed,
            "only_alerted_group_changed": (set(changed) <= set(alerted) if changed is not None and not arm.one_size
                                           else None),
        }
    # the split: every user is in exactly one arm
    owners: dict[str, list[str]] = {}
    for name, arm in arms.items():
        for u in arm.users:
            owners.setdefault(u, []).append(name)
    return {
        "world": world.name, "world_file": str(options.world_file), "seed": options.seed,
        "arms": list(arms), "minutes": options.minutes, "rate": options.rate, "impressions": count,
        "round_every_min": options.round_every_min, "min_impressions": options.min_impressions,
        "quick": options.quick, "groups": groups,
        "oracle_ctr": {g: oracle.get(g) for g in groups},
        "users_in_several_arms": sum(1 for v in owners.values() if len(v) > 1),
        "shifts": shifts, "shifted_groups": shifted_groups,
        "results": out_arms,
        "seconds": {"base": round(base_s, 1), "traffic_and_rounds": round(traffic_s, 1), "total": round(total_s, 1)},
        "settings": {"model": settings.model.model_dump(mode="json"), "dpo": settings.dpo.model_dump(mode="json"),
                     "onpolicy_candidates": settings.loop.onpolicy_candidates,
                     "promotion": settings.loop.promotion, "lineage": settings.loop.lineage,
                     "pretrain": settings.pretrain.model_dump(mode="json")},
        "notes": ["observed CTRs include the world's user and product offsets; the oracle is the expected CTR of "
                  "the best of 200 (quick: 40) random prompts per judged product for the group's average member, "
                  "without offsets, at t = 0: a reference level, not a bound on the observed CTR"],
    }


def _segments(world: World, category: str) -> list[Any]:
    return list(world.segments.get(category, []))


def write_report(report: Mapping[str, Any], out: Path) -> list[Path]:
    """Write ``experiment.json`` and the PNG plots under ``out``; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "experiment.json"]
    paths[0].write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    results, groups = report["results"], report["groups"]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for i, (name, r) in enumerate(results.items()):
        t = [row[0] / 60 for row in r["ctr_over_time"]]
        ax.plot(t, [row[2] / row[1] if row[1] else np.nan for row in r["ctr_over_time"]], label=name)
        colour = ax.lines[-1].get_color()
        for v in r["versions"][1:]:
            ax.axvline(v["live_ts_s"] / 60, ls=":", alpha=0.4, color=colour)
            if "targets" in v:  # per-target promotion: which targets the version went live for
                ax.annotate(f"{v['version'].rsplit('-', 1)[-1]}: {', '.join(v['targets'])}", (v["live_ts_s"] / 60, 1),
                            xycoords=("data", "axes fraction"), rotation=90, va="top", fontsize=6, color=colour,
                            ha="right" if i % 2 == 0 else "left")  # arms alternate sides of the line
    for name, r in results.items():
        for a in r["drift_alerts"]:
            ax.axvline(a["ts_s"] / 60, color="red", alpha=0.3)
    for s in report["shifts"]:
        ax.axvline(s["at_s"] / 60, color="black", ls="--", alpha=0.5)
    ax.set_xlabel("simulated minutes (dotted: new version live; red: drift alert; dashed: world shift)")
    ax.set_ylabel("CTR per 30 s")
    ax.set_title(f"CTR over time per arm — {report['world']}, seed {report['seed']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "ctr_over_time.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    cols = groups + ["worst group"]
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(cols) + 2), 4.2), dpi=110)
    width = 0.8 / (len(results) + 1)
    x = np.arange(len(cols))
    for i, (name, r) in enumerate(results.items()):
        vals = [r["per_group"][g]["ctr"] or np.nan for g in groups] + [r["worst_ctr"] or np.nan]
        cis = [r["per_group"][g]["ci95"] for g in groups] + [r["worst_ci95"] or [np.nan, np.nan]]
        err = np.array([[max(0.0, v - c[0]) for v, c in zip(vals, cis)], [max(0.0, c[1] - v) for v, c in zip(vals, cis)]])
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, yerr=err, capsize=2, label=name)
    oracle = [report["oracle_ctr"].get(g) or np.nan for g in groups] + [np.nan]
    ax.bar(x + len(results) * width - 0.4 + width / 2, oracle, width, color="lightgrey", label="oracle (expected)")
    ax.set_xticks(x, cols, rotation=30, ha="right")
    ax.set_ylabel("observed CTR (95 % Wilson interval)")
    ax.set_title("per-group and worst-group CTR per arm")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "ctr_per_group.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for name, r in results.items():
        rows = [(rd["round"], rd["evidence_to_live_s"]) for rd in r["rounds"] if "evidence_to_live_s" in rd]
        if rows:
            ax.plot([a for a, _ in rows], [b for _, b in rows], "o-", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("pairs' evidence → new version serving (simulated s)")
    ax.set_title("evidence → live per promoted round")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "evidence_to_live.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths
