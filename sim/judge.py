"""Judge a G-MLLM in a simulated world: the expected CTR, per learned group, of the creatives it serves.

A learned group (e.g. ``sneakers/g3``) mixes users of several hidden
segments; its CTR for a creative is the members' average click probability
under the world's pixel click model (exact expectation, no drawn clicks).
:class:`WorldCTR` samples the model's candidates for each group and the first
products of its category, keeps the one the model serves
(:func:`learner.evaluate.choose_creative`), and averages. It is the
``served_ctr`` judge of :func:`learner.round.run_round`.

The oracle figure of a group is the best CTR among a fixed set of random
prompts, per product (the same search as ``osmf world oracle``).
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from infra.contracts.prompt import CreativePrompt, parse_prompt, random_prompt
from infra.settings import GenerationSettings, LearnerSettings, Settings
from learner.data import ProductRecord, TrafficLog
from learner.dpo.data import one_size_prefix
from learner.evaluate import choose_creative
from features.group import GroupFeatures
from learner.loop import FeaturesFor, JudgeFor
from learner.model.gmllm import GMLLM
from learner.service import JudgeFactory
from sim.oracle import sample_prompts
from sim.schema import WorldError
from sim.world import Product, World
from streams.ctr import CreativeStats
from streams.grouping import ProductAwareGrouper

if TYPE_CHECKING:
    from features.read import FeatureReader


def group_members(world: World, grouper: ProductAwareGrouper) -> dict[str, Counter]:
    """Per learned group, how many of its users sit in each hidden segment (``category/segment``)."""
    members: dict[str, Counter] = {}
    for category in world.categories:
        for user in world.users:
            group = grouper.assign(category, dict(user.attributes))
            members.setdefault(group, Counter())[world.segment_of(user, category).key] += 1
    return members


def store_group_members(world: World, reader: FeatureReader) -> dict[str, Counter]:
    """:func:`group_members` for the groups the feature store serves: each world user's group per category
    from ``reader.resolve_groups`` (the worker's ``user_group`` view); users the store has no group for are skipped."""
    members: dict[str, Counter] = {}
    user_ids = [user.id for user in world.users]
    for category in world.categories:
        for user, group in zip(world.users, reader.resolve_groups(user_ids, category)):
            if group is not None:
                members.setdefault(group, Counter())[world.segment_of(user, category).key] += 1
    return members


def group_ctr(world: World, members: Counter, product: Product, prompt: CreativePrompt) -> float:
    """Expected CTR of ``prompt`` on ``product`` for a group's average member (segments mixed by membership)."""
    visual = world.features(product, prompt)
    total = sum(members.values())
    return sum(
        n * world.click_probability(world.segment(*key.split("/", 1)), visual) for key, n in members.items()
    ) / total


@dataclass
class WorldCTR:
    """Simulated CTR per group of the creatives a model serves; callable as a ``served_ctr`` judge.

    After a call, ``last_se`` holds each group's standard error over its
    judged products and draws, and ``last_per_product`` the served CTR of
    each (product, draw), product-major.

    Parameters
    ----------
    world, members
        The world and each learned group's segment counts (:func:`group_members`).
    features, products
        Group features (the prefix the model reads) and the learner's product records.
    generation
        How creatives are sampled and chosen (as served).
    products_per_group
        The first this many products of each group's category are judged ...
    first_product
        ... from this index on (another slice of the catalogue: a gate's judge
        that does not see the benchmark's judged products).
    scorer
        Rerank candidates with this model's click head (default: the judged model's own).
    """

    world: World
    members: Mapping[str, Counter]
    features: Mapping[str, GroupFeatures | str]
    products: Mapping[str, ProductRecord]
    generation: GenerationSettings
    products_per_group: int = 4
    last_sampled: dict[str, float] = field(default_factory=dict)
    first_product: int = 0
    last_se: dict[str, float] = field(default_factory=dict)
    last_per_product: dict[str, list[float]] = field(default_factory=dict)
    scorer: GMLLM | None = None
    draws: int = 1
    """Served creatives chosen per product, each from its own sample of candidates (seeds differ): more
    draws lower the variance of a group's figure; every model is drawn with the same seeds (paired)."""
    serve: str = "rerank"
    """What a group is served: ``rerank``, the candidate the click answer scores highest (one creative per
    product and draw); ``slate``, the whole sampled slate, each candidate alike: the mean CTR of the policy's
    own samples, what the creative client's Thompson sampling starts from before clicks favour the best."""
    seed_offset: int = 0
    """Added to every sampling seed: a judge with another offset draws independent samples (e.g. the truth
    beside an estimate that uses offset 0)."""
    only: frozenset[str] | None = None
    """Judge only these groups (None: every group with features and members); see :meth:`restricted`."""

    def groups(self) -> list[str]:
        """Groups that have both features and members (those of ``only``, when set)."""
        return sorted(g for g in self.features if self.members.get(g) and (self.only is None or g in self.only))

    def restricted(self, groups: Iterable[str]) -> WorldCTR:
        """The same judge (products, draws, seeds) for ``groups`` only: a version that serves only some groups
        is judged where it serves."""
        return dataclasses.replace(self, only=frozenset(groups), last_sampled={}, last_se={}, last_per_product={})

    def judged_products(self, group: str) -> list[Product]:
        """The products of ``group``'s category that are judged."""
        category = group.split("/", 1)[0]
        known = [p for p in self.world.products.get(category, []) if p.id in self.products]
        return known[self.first_product : self.first_product + self.products_per_group]

    def __call__(self, gmllm: GMLLM, one_size: bool = False) -> dict[str, float]:
        """Mean CTR per group of the served creative; ``last_sampled`` gets the mean over all candidates."""
        served: dict[str, float] = {}
        self.last_sampled, self.last_se, self.last_per_product = {}, {}, {}
        # A served slate is judged by all its candidates: scoring them with the click answer would be wasted.
        generation = self.generation.model_copy(update={"rerank": False}) if self.serve == "slate" else self.generation
        for group in self.groups():
            counts = self.members[group]
            prefix = one_size_prefix(group.split("/", 1)[0]) if one_size else self.features[group]
            chosen, sampled = [], []
            for index, product in enumerate(self.judged_products(group)):
                for draw in range(max(1, self.draws)):
                    choice = choose_creative(gmllm, prefix, self.products[product.id], generation,
                                             seed=index + 1_000 * draw + self.seed_offset, scorer=self.scorer)
                    valid = [c.prompt for c in choice.candidates if c.prompt is not None]
                    values = [group_ctr(self.world, counts, product, p) for p in valid]
                    served_value = group_ctr(self.world, counts, product, choice.prompt)
                    chosen.append(float(np.mean(values)) if self.serve == "slate" and values else served_value)
                    sampled.extend(values)
            if chosen:
                served[group] = float(np.mean(chosen))
                self.last_per_product[group] = [float(v) for v in chosen]
                self.last_se[group] = float(np.std(chosen, ddof=1) / np.sqrt(len(chosen))) if len(chosen) > 1 else 0.0
                self.last_sampled[group] = float(np.mean(sampled)) if sampled else served[group]
        return served

    def reweighted(self, candidate: GMLLM, incumbent: GMLLM,
                   one_size: bool = False) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Per group, per (product, draw): the candidate's slate CTR estimated on the *incumbent's* samples, and the
        incumbent's own slate CTR on them (off-policy evaluation, paired exactly).

        Each sample's CTR is weighted by ``p_candidate / p_incumbent`` of its text (self-normalised within the
        slate; :meth:`learner.model.gmllm.GMLLM.completion_logprobs`), so a candidate close to the incumbent is
        judged on the same creatives instead of on a fresh sample that differs by chance. In production the
        samples are the incumbent's logged slates and the CTR their observed clicks. Needs ``serve="slate"``.
        """
        new: dict[str, list[float]] = {}
        old: dict[str, list[float]] = {}
        for group in self.groups():
            counts = self.members[group]
            prefix = one_size_prefix(group.split("/", 1)[0]) if one_size else self.features[group]
            for index, product in enumerate(self.judged_products(group)):
                record = self.products[product.id]
                for draw in range(max(1, self.draws)):
                    samples = [g for g in incumbent.generate(
                        prefix, record, n=self.generation.candidates, seed=index + 1_000 * draw,
                        temperature=self.generation.temperature, constrained=self.generation.constrained,
                        max_new_tokens=self.generation.max_new_tokens) if g.prompt is not None]
                    if not samples:
                        continue
                    values = np.array([group_ctr(self.world, counts, product, g.prompt) for g in samples])
                    items = [(prefix, record, g.text) for g in samples]
                    log_ratio = candidate.completion_logprobs(items) - incumbent.completion_logprobs(items)
                    weights = np.exp(log_ratio - log_ratio.max())
                    new.setdefault(group, []).append(float(np.sum(weights * values) / np.sum(weights)))
                    old.setdefault(group, []).append(float(values.mean()))
        return new, old

    def random_ctr(self, prompts_per_product: int = 8, seed: int = 0) -> dict[str, float]:
        """Mean CTR per group of random prompts (the floor)."""
        out = {}
        for group in self.groups():
            rng = random.Random(f"random:{seed}:{group}")
            values = [group_ctr(self.world, self.members[group], product, random_prompt(rng))
                      for product in self.judged_products(group) for _ in range(prompts_per_product)]
            out[group] = float(np.mean(values)) if values else float("nan")
        return out

    def oracle_ctr(self, n_prompts: int = 200, seed: int = 0) -> dict[str, float]:
        """Mean over products of the best CTR among ``n_prompts`` random prompts, per group (the ceiling)."""
        prompts = sample_prompts(n_prompts, seed)
        out = {}
        for group in self.groups():
            best = [max(group_ctr(self.world, self.members[group], product, p) for p in prompts)
                    for product in self.judged_products(group)]
            out[group] = float(np.mean(best)) if best else float("nan")
        return out


def traffic_members(world: World, traffic: TrafficLog) -> dict[str, Counter]:
    """Per group of the traffic log, how many of its users sit in each hidden segment of ``world``."""
    users = {user.id: user for user in world.users}
    members: dict[str, Counter] = {}
    seen: set[tuple[str, str]] = set()
    for record in traffic.records:
        key = (record.group_id, record.user_id)
        if key in seen or record.user_id not in users or record.category not in world.categories:
            continue
        seen.add(key)
        segment = world.segment_of(users[record.user_id], record.category)
        members.setdefault(record.group_id, Counter())[segment.key] += 1
    return members


def world_judge_factory(world: World, settings: Settings, learner: LearnerSettings) -> JudgeFactory:
    """A :data:`learner.service.JudgeFactory`: the loop's gate judges candidates by simulated CTR in ``world``.

    Members of the live groups come from the feature store's user -> group view
    when the store is on and applied, else from the catalogue's traffic log.
    """

    def factory(traffic: TrafficLog, features_for: FeaturesFor, echo: Callable[[str], None]) -> JudgeFor:
        members = None
        if settings.features.enabled:
            from features.store import is_applied

            if is_applied(settings):
                from features.read import FeatureReader

                members = store_group_members(world, FeatureReader(settings)) or None
        source = "the feature store"
        if members is None:
            members, source = traffic_members(world, traffic), "the base run's traffic log"
        if not members:
            raise WorldError(f"--world {world.source}: none of the traffic log's users live in this world; give the "
                             "world the base run was simulated from")
        echo(f"simulated CTR: world {world.name}, {len(members)} groups (members from {source})")
        products = traffic.products

        def judge_for(features: Mapping[str, GroupFeatures | str]) -> WorldCTR:
            judged = {**features_for(sorted(members)), **features}
            return WorldCTR(world, members, judged, products, learner.generation, learner.loop.ctr_products_per_group,
                            draws=learner.loop.ctr_draws_per_product, serve=learner.loop.ctr_served)

        return judge_for

    return factory


def simulate_slate_traffic(
    world: World,
    members: Mapping[str, Counter],
    slates: Mapping[tuple[str, str], list[str]],
    impressions_per_creative: int,
    seed: int = 0,
) -> dict[tuple[str, str], dict[str, CreativeStats]]:
    """Impressions and clicks of on-policy slates: every creative of a (group, product) slate is shown
    ``impressions_per_creative`` times to the group's members.

    A member is drawn uniformly (its hidden segment by membership) and clicks
    with the world's click probability, so a creative's clicks are
    ``Binomial(n, group_ctr)`` of :func:`group_ctr` (the judge's figure; no
    user or product offsets). Returns counts per slate and prompt text.
    Slates of groups without members or of products the world lacks are left out.
    """
    by_id = {product.id: product for product in world.all_products()}
    rng = np.random.default_rng(seed)
    out: dict[tuple[str, str], dict[str, CreativeStats]] = {}
    for (group, product_id), prompts in sorted(slates.items()):
        counts = members.get(group)
        product = by_id.get(product_id)
        if not counts or product is None:
            continue
        out[(group, product_id)] = {
            text: CreativeStats(impressions_per_creative,
                                int(rng.binomial(impressions_per_creative,
                                                 group_ctr(world, counts, product, parse_prompt(text)))))
            for text in prompts
        }
    return out
