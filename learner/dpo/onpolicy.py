"""On-policy Group-DPO rounds: pairs among the creatives the live model itself writes.

One round (iterative / online DPO, as CAIG ran several rounds):

1. :func:`sample_slates` — the live model samples ``K`` creatives per
   (group, product) with the group's prefix (constrained decoding, as
   served), duplicates dropped;
2. the ad system shows them and logs impressions and clicks (in production
   serving and the stream worker; in the benchmark
   :func:`sim.judge.simulate_slate_traffic`);
3. :func:`mine_slate_pairs` — the stream worker's
   :class:`streams.pairs.PairMiner` calls winners among each slate, and
   :func:`with_margin` keeps the pairs whose winner's observed CTR beats the
   loser's by a relative margin (evidence *and* size);
4. :func:`quiet_group_anchors` — every group that got no pair, in any category,
   contributes the live model's own samples as *anchors*, held by a KL term
   to the incumbent (or SFT rows with ``chosen == rejected``), so the fit keeps
   that group's generations near the incumbent's instead of letting other
   groups' pairs move them through the attribute tokens all categories share;
5. :func:`learner.dpo.train.fit_group_dpo` fits from the live model, which is
   also the frozen reference of the round.

>>> from streams.ctr import CreativeStats
>>> from streams.pairs import PairMinerConfig
>>> stats = {("mugs/g0", "p1"): {"A": CreativeStats(2000, 120), "B": CreativeStats(2000, 40)}}
>>> pairs = mine_slate_pairs(stats, {"p1": "mugs"}, PairMinerConfig(min_impressions=100), ts=0)
>>> [(p.winner_prompt, p.loser_prompt) for p in pairs]
[('A', 'B')]
>>> len(with_margin(pairs, 0.5)), len(with_margin(pairs, 3.0))
(1, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from features.group import GroupFeatures
from infra.settings import LearnerSettings
from infra.contracts.messages import PreferencePair
from learner.data import ProductRecord
from learner.dpo.data import creative_id
from learner.model.gmllm import GMLLM
from streams.ctr import CreativeStats
from streams.pairs import PairMiner, PairMinerConfig

SlateKey = tuple[str, str]
"""(group id, product id)."""

MIRROR_MODES = ("mirror", "both", "mirror_kl")
"""``learner.dpo.preserve`` values that add mirrored pairs (:func:`protection_pairs`)."""
ANCHOR_MODES = ("sft", "both", "kl", "mirror_kl")
"""``learner.dpo.preserve`` values that anchor groups without pairs (:func:`quiet_group_anchors`)."""
KL_MODES = ("kl", "mirror_kl")
"""... of those, the ones that hold the anchors by a KL term (:mod:`learner.dpo.anchor`) rather than SFT rows."""


@dataclass(frozen=True)
class Anchor:
    """One of the incumbent's own creatives for a group without evidence: kept likely by the SFT term."""

    group_id: str
    product_id: str
    prompt: str


def target_groups(target: str, groups: Sequence[str]) -> list[str]:
    """The judged ``groups`` a training target serves: itself, or every group of its category for a one-size
    target (``<category>/all``).

    >>> target_groups("mugs/all", ["mugs/g0", "mugs/g1", "pens/g0"])
    ['mugs/g0', 'mugs/g1']
    >>> target_groups("mugs/g1", ["mugs/g0", "mugs/g1"])
    ['mugs/g1']
    """
    if target.endswith("/all"):
        category = target.split("/", 1)[0]
        return [g for g in groups if g.split("/", 1)[0] == category]
    return [g for g in groups if g == target]


def lineages(targets: Iterable[str], live_model: Callable[[str], GMLLM],
             split: str = "version") -> list[tuple[GMLLM, list[str]]]:
    """Per-group promotion: ``targets`` grouped by the live model that serves each (``live_model(target)``),
    targets sorted; a round fits each lineage from its model on its own targets' pairs.

    ``split`` (``learner.loop.lineage``): ``version``, one lineage per model; ``category``, per model and
    category; ``group``, one per target."""
    out: dict[tuple[int, str], tuple[GMLLM, list[str]]] = {}
    for target in sorted(targets):
        model = live_model(target)
        out.setdefault((id(model), lineage_part(target, split)), (model, []))[1].append(target)
    return list(out.values())


def lineage_part(target: str, split: str) -> str:
    """The part of a version's targets ``target`` is fitted with under ``learner.loop.lineage`` = ``split``."""
    if split == "version":
        return ""
    if split == "category":
        return target.split("/", 1)[0]
    if split == "group":
        return target
    raise ValueError(f"learner.loop.lineage must be version, category or group, got {split!r}")


def sample_slates(
    gmllm: GMLLM,
    targets: Mapping[str, GroupFeatures | str],
    products: Mapping[str, Sequence[ProductRecord]],
    k: int,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 64,
    distinct: bool = True,
) -> dict[SlateKey, list[str]]:
    """``k`` sampled creatives (distinct canonical prompt texts, in sampling order) per (group, product).

    ``targets`` maps a group id to what the model reads for it (its features
    or a prefix); ``products`` maps the group id to the products it is shown.
    Sampling is seeded per (round seed, group, product index), so the same
    model and seed give the same slates. ``distinct=False`` keeps duplicates.
    """
    slates: dict[SlateKey, list[str]] = {}
    for g_index, group in enumerate(sorted(targets)):
        for p_index, product in enumerate(products.get(group, ())):
            generations = gmllm.generate(targets[group], product, n=k, seed=seed * 100_003 + g_index * 1_009 + p_index,
                                         temperature=temperature, constrained=True, max_new_tokens=max_new_tokens)
            texts: list[str] = []
            for generation in generations:
                if generation.prompt is not None:
                    text = generation.prompt.to_text()
                    if not distinct or text not in texts:
                        texts.append(text)
            if texts:
                slates[(group, product.id)] = texts
    return slates


def mine_slate_pairs(
    stats: Mapping[SlateKey, Mapping[str, CreativeStats]],
    categories: Mapping[str, str],
    config: PairMinerConfig | None = None,
    *,
    ts: int = 0,
) -> list[PreferencePair]:
    """Preference pairs among each slate's creatives (prompt text -> counts), mined by the stream worker's miner.

    ``categories`` maps a product id to its category. The miner is drained
    (called until it emits nothing), as :func:`learner.dpo.data.pairs_from_traffic` does.
    """
    miner = PairMiner(config)
    pairs: list[PreferencePair] = []
    for (group, product), creatives in sorted(stats.items()):
        if len(creatives) < 2:
            continue
        by_id = {creative_id(prompt): (counts, prompt) for prompt, counts in creatives.items()}
        category = categories.get(product, group.split("/", 1)[0])
        while found := miner.mine(group, category, product, by_id, ts=ts):
            pairs.extend(found)
    return pairs


def with_margin(pairs: Iterable[PreferencePair], min_lift: float) -> list[PreferencePair]:
    """Pairs whose winner's observed CTR is at least ``(1 + min_lift)`` times the loser's (0 keeps all)."""
    return [p for p in pairs if p.winner_ctr >= (1.0 + min_lift) * p.loser_ctr and p.winner_ctr > p.loser_ctr]


def best_winner_pairs(pairs: Iterable[PreferencePair]) -> list[PreferencePair]:
    """Per (group, product), only the pairs whose winner is the slate's best winner.

    The slate's best creative (highest observed CTR among winners) against
    every creative it beats: every pair pushes towards the same creative, not
    towards a middling one that merely beat a poor one.
    """
    best: dict[SlateKey, float] = {}
    kept = list(pairs)
    for pair in kept:
        key = (pair.group_id, pair.product_id)
        best[key] = max(best.get(key, -1.0), pair.winner_ctr)
    return [p for p in kept if p.winner_ctr >= best[(p.group_id, p.product_id)]]


def mirrored_pairs(
    pairs: Sequence[PreferencePair], groups: Iterable[str], max_per_group: int | None = None
) -> list[PreferencePair]:
    """Neutral pairs for groups without evidence: every pair of another group of the same category, both ways,
    under the quiet group's id (so its prefix).

    Under TRL's sigmoid loss the two orientations sum to ``-log σ(βΔ) - log σ(-βΔ)``, smallest at ``Δ = 0``: the
    quiet group's preference between exactly the creatives the fit moves is held where the incumbent (the
    reference) has it, so other groups' pairs cannot drag it through shared weights. At most
    ``max_per_group`` source pairs per quiet group (the most confident first).
    """
    by_category: dict[str, list[PreferencePair]] = {}
    for pair in sorted(pairs, key=lambda p: (-p.prob_winner_better, p.pair_id)):
        by_category.setdefault(pair.category, []).append(pair)
    out: list[PreferencePair] = []
    for group in sorted(set(groups)):
        category = group.split("/", 1)[0]
        sources = [p for p in by_category.get(category, []) if p.group_id != group][:max_per_group]
        for pair in sources:
            for flip in (False, True):
                update = {"group_id": group, "pair_id": f"{pair.pair_id}~{group}~{int(flip)}"}
                if flip:
                    update.update(
                        winner_creative_id=pair.loser_creative_id, loser_creative_id=pair.winner_creative_id,
                        winner_prompt=pair.loser_prompt, loser_prompt=pair.winner_prompt,
                        winner_impressions=pair.loser_impressions, winner_clicks=pair.loser_clicks,
                        loser_impressions=pair.winner_impressions, loser_clicks=pair.winner_clicks,
                        winner_ctr=pair.loser_ctr, loser_ctr=pair.winner_ctr,
                        prob_winner_better=0.5,
                    )
                else:
                    update["prob_winner_better"] = 0.5
                out.append(pair.model_copy(update=update))
    return out


def protection_pairs(
    pairs: Sequence[PreferencePair], targets: Iterable[str], preserve: str, scope: str, one_size: bool = False
) -> list[PreferencePair]:
    """The mirrored pairs a fit adds to hold groups where the incumbent has them (``learner.dpo.preserve``).

    ``scope="quiet"``: only groups without a pair of their own; ``"all"``: every group also gets the other
    groups' pairs of its category mirrored, so through shared weights those pairs can move it no more than
    its own pairs ask for. None for the one-size baseline or when ``preserve`` has no mirror.
    """
    if one_size or preserve not in MIRROR_MODES or not pairs:
        return []
    with_pairs = {p.group_id for p in pairs}
    held = sorted(targets) if scope == "all" else sorted(set(targets) - with_pairs)
    return mirrored_pairs(pairs, held)


def anchored_groups_with_pairs(pairs: Iterable[PreferencePair], scope: str) -> set[str]:
    """The groups :func:`quiet_group_anchors` leaves out: those with pairs (``scope="quiet"``), none (``"all"``:
    every group is also held against the other groups' pairs, its own pairs pulling against its anchors)."""
    return {p.group_id for p in pairs} if scope == "quiet" else set()


def quiet_group_anchors(
    incumbent: GMLLM,
    targets: Mapping[str, GroupFeatures | str],
    products: Mapping[str, ProductRecord],
    groups_with_pairs: Iterable[str],
    products_per_group: int,
    k: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
) -> list[Anchor]:
    """Anchors for every target without a pair, in any category: the incumbent's own ``k`` samples on the first
    ``products_per_group`` products (by id) of the target's category, duplicates kept.

    The SFT term on them is distillation: ``E_incumbent[-log π(y)]`` is least where ``π`` equals the incumbent,
    so a creative it writes often keeps its weight (deduplicated samples would pull toward the rare ones).
    A fit on one category's pairs moves the attribute tokens every category shares, so every quiet group is
    held, not only those that share a category with the pairs.
    """
    covered = set(groups_with_pairs)
    by_category: dict[str, list[ProductRecord]] = {}
    for record in sorted(products.values(), key=lambda r: r.id):
        by_category.setdefault(record.category, []).append(record)
    quiet = {g: f for g, f in targets.items() if g not in covered}
    shown = {g: by_category.get(g.split("/", 1)[0], [])[:products_per_group] for g in quiet}
    slates = sample_slates(incumbent, quiet, shown, k, temperature=temperature, seed=seed,
                           max_new_tokens=max_new_tokens, distinct=False)
    return [Anchor(group, product, text) for (group, product), texts in sorted(slates.items()) for text in texts]


@dataclass(frozen=True)
class Protection:
    """What a fit adds to hold groups where the incumbent has them (``learner.dpo.preserve``)."""

    mirrored: list[PreferencePair]
    anchors: list[Anchor]


def protection_for(pairs: Sequence[PreferencePair], incumbent: GMLLM, targets: Mapping[str, GroupFeatures | str],
                   products: Mapping[str, ProductRecord], settings: LearnerSettings, seed: int,
                   one_size: bool = False) -> Protection:
    """The mirrored pairs (:func:`protection_pairs`) and anchors (:func:`quiet_group_anchors`) of a fit on
    ``pairs`` from ``incumbent``: one rule for production rounds, the benchmark and the online experiment."""
    dpo, loop = settings.dpo, settings.loop
    mirrored = protection_pairs(pairs, targets, dpo.preserve, dpo.preserve_scope, one_size)
    if one_size or not pairs or dpo.preserve not in ANCHOR_MODES:
        return Protection(mirrored, [])
    anchors = quiet_group_anchors(incumbent, targets, products, anchored_groups_with_pairs(pairs, dpo.preserve_scope),
                                  dpo.anchor_products, loop.onpolicy_candidates, seed=seed,
                                  temperature=loop.onpolicy_temperature,
                                  max_new_tokens=settings.generation.max_new_tokens)
    return Protection(mirrored, anchors)
