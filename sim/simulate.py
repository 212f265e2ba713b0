"""Play the ad system in a simulated world: impressions of random creatives, and the clicks they get.

Each product has a fixed set of random creatives (prompts from
:func:`infra.contracts.prompt.random_prompt`, ``model_version="random"``). Every
impression picks a user and a product uniformly, one of the product's
creatives uniformly, and draws the click from the world's pixel click model.
Everything is reproducible: the same world, seed and arguments give the same
events, ``event_id`` included.

>>> from pathlib import Path
>>> from sim.world import World
>>> world = World.load(Path(__file__).parent / "examples" / "world_a.yaml")
>>> events = list(generate_events(world, seed=1, n_impressions=50))
>>> sum(e.type == "impression" for e in events)
50
>>> events == list(generate_events(world, seed=1, n_impressions=50))
True
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.contracts.events import Click, Impression
from infra.contracts.prompt import CreativePrompt, random_prompt
from infra.settings import Settings
from sim.world import Product, Segment, User, World

DEFAULT_START_TS_MS = 1_767_225_600_000
"""2026-01-01T00:00:00Z: where simulated time starts unless told otherwise."""
MODEL_VERSION = "random"
"""Model version of the random creatives."""


@dataclass(frozen=True)
class Creative:
    """A product's creative: its stable id and the prompt it was rendered from."""

    id: str
    product_id: str
    prompt: CreativePrompt


@dataclass(frozen=True)
class Shown:
    """What the ad system showed for one impression: the creative, the model version and group that chose it.

    ``features``: the visual features of the pixels actually served (None:
    the world renders ``prompt`` itself, as it does for random creatives).
    """

    creative_id: str
    prompt: CreativePrompt
    model_version: str = "random"
    group_id: str | None = None
    features: Mapping[str, float] | None = None


Chooser = Callable[[User, Product], Shown]
"""Picks the creative to show a user for a product (the ad system's decision; e.g. :mod:`sim.adsystem`)."""


def creative_id(product_id: str, prompt: CreativePrompt) -> str:
    """Stable id of the creative of ``prompt`` for ``product_id`` (a hash of both).

    >>> from infra.contracts.prompt import parse_prompt
    >>> p = parse_prompt('background=solid; palette=red,white; position=center; scale=0.5; copy=""; style=')
    >>> creative_id("mug-0001", p) == creative_id("mug-0001", p) != creative_id("mug-0002", p)
    True
    """
    digest = hashlib.blake2b(f"{product_id}|{prompt.to_text()}".encode(), digest_size=8).hexdigest()
    return f"cr-{digest}"


def product_creatives(world: World, seed: int, creatives_per_product: int) -> dict[str, list[Creative]]:
    """Each product's fixed set of distinct random creatives, reproducible from ``seed``."""
    if creatives_per_product < 1:
        raise ValueError(f"creatives_per_product must be at least 1, got {creatives_per_product}")
    creatives: dict[str, list[Creative]] = {}
    for product in world.all_products():
        rng = random.Random(f"creatives:{world.spec.seed}:{seed}:{product.id}")
        chosen: dict[str, Creative] = {}
        while len(chosen) < creatives_per_product:
            prompt = random_prompt(rng)
            chosen.setdefault(prompt.to_text(), Creative(creative_id(product.id, prompt), product.id, prompt))
        creatives[product.id] = list(chosen.values())
    return creatives


def generate_events(
    world: World,
    seed: int = 0,
    *,
    n_impressions: int | None = None,
    duration_s: float | None = None,
    rate: float = 500.0,
    creatives_per_product: int = 4,
    start_ts_ms: int = DEFAULT_START_TS_MS,
    placement: str = "feed",
    click_delay_ms: tuple[int, int] = (200, 5000),
    chooser: Chooser | None = None,
) -> Iterator[Impression | Click]:
    """Yield impressions, each followed by its click when the simulated user clicks.

    Parameters
    ----------
    world
        The simulated world.
    seed
        Seeds the creatives, the traffic and the clicks; with the other
        arguments it fixes the event sequence, ``event_id`` included.
    n_impressions, duration_s
        How many impressions: give exactly one; ``duration_s`` means
        ``round(duration_s * rate)`` impressions.
    rate
        Impressions per second of simulated time: impression ``i`` has
        ``ts = start_ts_ms + floor(i * 1000 / rate)``, and preference shifts
        happen at ``i / rate`` seconds.
    creatives_per_product
        Random creatives each product rotates through.
    start_ts_ms
        Epoch milliseconds of the first impression.
    placement
        Placement name written into impressions.
    click_delay_ms
        A click's ``ts`` is its impression's plus a uniform delay in this range.
    chooser
        Who picks the creative of each impression (e.g. a serving client,
        :mod:`sim.adsystem`); default: one of the product's fixed random
        creatives, uniformly. Clicks follow from the world's click model on
        the chosen creative's pixels either way.

    Yields
    ------
    Impression or Click
        A click comes right after its impression (its ``ts`` is later than
        the impression's, and may be later than the next impressions').
    """
    if (n_impressions is None) == (duration_s is None):
        raise ValueError("give exactly one of n_impressions or duration_s")
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    count = n_impressions if n_impressions is not None else round(float(duration_s) * rate)  # type: ignore[arg-type]
    if count < 0:
        raise ValueError(f"the number of impressions must not be negative, got {count}")
    creatives = product_creatives(world, seed, creatives_per_product)
    products = world.all_products()
    users = world.users
    rng = random.Random(f"events:{world.spec.seed}:{seed}")
    prefix = "sim-" + hashlib.blake2b(
        f"{world.name}:{world.spec.seed}:{seed}:{start_ts_ms}".encode(), digest_size=5
    ).hexdigest()
    logits: dict[tuple[str, str, int], float] = {}
    low_delay, high_delay = click_delay_ms
    for i in range(count):
        ts = start_ts_ms + math.floor(i * 1000 / rate)
        user = users[rng.randrange(len(users))]
        product = products[rng.randrange(len(products))]
        pick = rng.randrange(creatives_per_product)
        if chooser is None:
            creative = creatives[product.id][pick]
            shown = Shown(creative.id, creative.prompt, MODEL_VERSION)
        else:
            shown = chooser(user, product)
        segment = world.segment_of(user, product.category)
        t_s = i / rate
        key = (segment.key, shown.creative_id, segment.phase(t_s))
        logit = logits.get(key)
        if logit is None:
            pixels = shown.features if shown.features is not None else world.features(product, shown.prompt)
            logit = world.click_logit(segment, pixels, t_s)
            logits[key] = logit
        offset = float(world.user_offsets[user.index]) + world.product_offsets[product.id]
        clicked = rng.random() < world.probability(logit + offset)
        impression = Impression(
            event_id=f"{prefix}-{i}",
            ts=ts,
            user_id=user.id,
            user=dict(user.attributes),
            product_id=product.id,
            category=product.category,
            product=product.attributes,
            creative_id=shown.creative_id,
            prompt=shown.prompt.to_text(),
            model_version=shown.model_version,
            placement=placement,
            group_id=shown.group_id,
        )
        delay = rng.randint(low_delay, high_delay)  # drawn either way: the traffic does not depend on the clicks
        yield impression
        if clicked:
            yield Click(
                event_id=f"{prefix}-{i}-c",
                ts=ts + delay,
                impression_id=impression.event_id,
                user_id=user.id,
                product_id=product.id,
                creative_id=shown.creative_id,
            )


def simulate_ctr(
    world: World,
    segment: Segment,
    product: Product,
    prompt: CreativePrompt,
    n: int,
    seed: int = 0,
    t_s: float = 0.0,
) -> float:
    """Measured CTR of ``prompt`` for ``product`` over ``n`` impressions to random members of ``segment``.

    Clicks are drawn like :func:`generate_events` draws them (user and product
    offsets, accidental-click floor), so this is what a perfectly attributed
    A/B cell would observe.
    """
    members = world.members(segment)
    if not members:
        raise ValueError(f"segment {segment.key} has no users")
    rng = random.Random(f"ctr:{world.spec.seed}:{seed}:{segment.key}:{product.id}:{prompt.to_text()}")
    logit = world.click_logit(segment, world.features(product, prompt), t_s) + world.product_offsets[product.id]
    clicks = 0
    for _ in range(n):
        user = members[rng.randrange(len(members))]
        clicks += rng.random() < world.probability(logit + float(world.user_offsets[user.index]))
    return clicks / n


EXAMPLE_WORLDS = Path(__file__).parent / "examples"
DEFAULT_WORLD = EXAMPLE_WORLDS / "world_a.yaml"


def world_path(settings: Settings, override: Path | None = None) -> Path:
    """The world file to use: the override, the settings' world, or example world A."""
    return override or settings.simulator.world or DEFAULT_WORLD


def simulated_events(
    world: World, settings: Settings, *, seed: int, rate: float, duration_s: float, start_ts_ms: int | None,
    chooser: Chooser | None = None,
) -> Iterator[Impression | Click]:
    """The simulator's events; ``start_ts_ms`` None stamps them from the current time; ``chooser``: see :func:`generate_events`."""
    start = start_ts_ms if start_ts_ms is not None else int(time.time() * 1000)
    return generate_events(
        world,
        seed,
        duration_s=duration_s,
        rate=rate,
        creatives_per_product=settings.simulator.creatives_per_product,
        start_ts_ms=start,
        chooser=chooser,
    )


def time_ordered(events: Iterable[Impression | Click]) -> Iterator[Impression | Click]:
    """Re-order the simulator's stream by ``ts``: clicks are held back until their time comes.

    The simulator yields each click right after its impression although its
    ``ts`` is later; an ad server would send it only when it happens.
    Impressions arrive in ``ts`` order, so a held event is released once an
    impression at or after its ``ts`` is seen.
    """
    held: list[tuple[int, int, Impression | Click]] = []
    for seq, event in enumerate(events):
        if isinstance(event, Impression):
            while held and held[0][0] <= event.ts:
                yield heapq.heappop(held)[2]
            yield event
        else:
            heapq.heappush(held, (event.ts, seq, event))
    while held:
        yield heapq.heappop(held)[2]


def counted(events: Iterable[Impression | Click], on_event: Callable[[], None]) -> Iterator[Impression | Click]:
    """Pass events through, calling ``on_event`` for each (drives a progress bar)."""
    for event in events:
        on_event()
        yield event
