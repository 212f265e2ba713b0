"""The oracle: the best click-through rate each hidden segment can reach.

Used to measure how close the system gets (regret) and to check that a world
is worth learning: each segment's best creative should beat its worst one
clearly, and the best creatives should differ between segments.

>>> from pathlib import Path
>>> from sim.world import World
>>> world = World.load(Path(__file__).parent / "examples" / "world_a.yaml")
>>> rows = oracle_table(world, n_prompts=20, seed=0)
>>> all(row.worst_ctr <= row.mean_ctr <= row.best_ctr for row in rows)
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from sim.world import Product, Segment, World
from infra.contracts.prompt import CreativePrompt, random_prompt


@dataclass(frozen=True)
class OracleRow:
    """Best, mean and worst CTR of one (category, segment) over the sampled prompts.

    ``one_size_ctr`` is this segment's CTR under the category's best
    one-size-fits-all prompt (the one with the highest share-weighted CTR over
    all segments): ``best_ctr − one_size_ctr`` is what tailoring can gain.
    """

    category: str
    segment: str
    share: float
    best_ctr: float
    mean_ctr: float
    worst_ctr: float
    one_size_ctr: float
    best_prompt: CreativePrompt
    worst_prompt: CreativePrompt


def sample_prompts(n_prompts: int, seed: int = 0) -> list[CreativePrompt]:
    """Up to ``n_prompts`` distinct random prompts (duplicates dropped), reproducible from ``seed``."""
    rng = random.Random(f"oracle:{seed}")
    prompts: dict[str, CreativePrompt] = {}
    for _ in range(n_prompts):
        prompt = random_prompt(rng)
        prompts.setdefault(prompt.to_text(), prompt)
    return list(prompts.values())


def oracle_table(
    world: World,
    n_prompts: int = 2000,
    seed: int = 0,
    *,
    products_per_category: int = 1,
    t_s: float = 0.0,
) -> list[OracleRow]:
    """For each category and hidden segment, the best, mean and worst CTR among random prompts.

    Parameters
    ----------
    world
        The simulated world.
    n_prompts
        Random prompts to try (the search space; rendering dominates the cost,
        and renders are cached in ``world``).
    seed
        Seeds the prompt sample.
    products_per_category
        CTR of a prompt is averaged over the first this many products of the
        category (1: the category's first product is the representative).
    t_s
        Time into the simulation, for worlds whose preferences shift.

    Returns
    -------
    list of OracleRow
        In category, then segment order. CTRs are for the segment's average
        user (no user or product offsets), including the click floor.
    """
    prompts = sample_prompts(n_prompts, seed)
    rows: list[OracleRow] = []
    for category in world.categories:
        products = world.products[category][: max(1, products_per_category)]
        segments = world.segments[category]
        ctr = np.array([[_mean_ctr(world, seg, products, prompt, t_s) for prompt in prompts] for seg in segments])
        shares = np.array([segment.share for segment in segments])
        one_size = int(np.argmax(shares @ ctr))
        for s, segment in enumerate(segments):
            best, worst = int(np.argmax(ctr[s])), int(np.argmin(ctr[s]))
            rows.append(
                OracleRow(
                    category=category,
                    segment=segment.name,
                    share=segment.share,
                    best_ctr=float(ctr[s, best]),
                    mean_ctr=float(ctr[s].mean()),
                    worst_ctr=float(ctr[s, worst]),
                    one_size_ctr=float(ctr[s, one_size]),
                    best_prompt=prompts[best],
                    worst_prompt=prompts[worst],
                )
            )
    return rows


def _mean_ctr(world: World, segment: Segment, products: list[Product], prompt: CreativePrompt, t_s: float) -> float:
    return sum(world.click_probability(segment, world.features(p, prompt), t_s) for p in products) / len(products)
