"""Logged traffic for the learner: simulated worlds and event logs turned into :class:`learner.data.TrafficLog`.

The learner reads a plain data format and never imports the world; this
module, in the composition root, produces it. Users are grouped the way the
stream worker groups them (:class:`streams.grouping.ProductAwareGrouper`,
every impression with its creative, every click), and each record carries
the group its user belongs to at the end of the log — the groups a feature
store would serve when pre-training starts.

>>> from pathlib import Path
>>> from sim.world import World
>>> world = World.load(Path(__file__).parent / "examples" / "world_a.yaml")
>>> log, grouper = traffic_from_world(world, n_impressions=200, seed=0)
>>> len(log.records), sorted(log.products)[:1]
(200, ['drill-0000'])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from sim.simulate import generate_events
from sim.world import World
from learner.data import ProductRecord, TrafficLog, TrafficRecord
from infra.contracts.events import Click, EventError, Impression, parse_event
from streams.grouping import GroupingConfig, ProductAwareGrouper


def world_products(world: World) -> dict[str, ProductRecord]:
    """The world's catalogue as learner product records (title, price, image cut-out)."""
    return {
        product.id: ProductRecord(product.id, product.category, product.title, product.price, product.image)
        for product in world.all_products()
    }


def traffic_from_events(
    events: Iterable[Impression | Click],
    products: dict[str, ProductRecord] | None = None,
    *,
    grouper: ProductAwareGrouper | None = None,
    learn: bool = True,
    on_event: Callable[[], None] | None = None,
) -> tuple[TrafficLog, ProductAwareGrouper]:
    """Group users and collect impression records with their clicks from an event stream.

    Parameters
    ----------
    events
        Impressions and clicks (a click after its impression; unmatched clicks are ignored).
    products
        Known products (with images); products only seen in impressions are
        added from the impression's ``title`` and ``price`` attributes.
    grouper
        The grouping model (a fresh default one when omitted).
    learn
        Train ``grouper`` on these events (default); ``False`` only assigns
        users with it as it is (a held-out log labelled with the training groups).
    on_event
        Called once per event (progress).

    Returns
    -------
    (TrafficLog, ProductAwareGrouper)
        The log, records labelled with the final group of their user, and the trained grouper.
    """
    grouper = grouper or ProductAwareGrouper(GroupingConfig())
    catalogue = dict(products or {})
    impressions: dict[str, Impression] = {}
    clicked: set[str] = set()
    users: dict[str, dict] = {}
    for event in events:
        if on_event is not None:
            on_event()
        if isinstance(event, Impression):
            impressions[event.event_id] = event
            users.setdefault(event.user_id, dict(event.user))
            if learn:
                grouper.learn_and_assign(event.category, event.user, event.creative_id)
            if event.product_id not in catalogue:
                title = event.product.get("title")
                price = event.product.get("price")
                catalogue[event.product_id] = ProductRecord(
                    event.product_id,
                    event.category,
                    str(title) if title is not None else event.product_id,
                    float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) else None,
                )
        else:
            shown = impressions.get(event.impression_id)
            if shown is None or event.impression_id in clicked:
                continue
            clicked.add(event.impression_id)
            if learn:
                grouper.learn_click(shown.category, shown.user, shown.creative_id)
    group_cache: dict[tuple[str, str], str] = {}
    records = []
    for event_id, imp in impressions.items():
        key = (imp.category, imp.user_id)
        group = group_cache.get(key)
        if group is None:
            group = group_cache[key] = grouper.assign(imp.category, imp.user)
        records.append(
            TrafficRecord(imp.ts, imp.user_id, group, imp.category, imp.product_id, imp.prompt, event_id in clicked)
        )
    return TrafficLog(catalogue, users, records), grouper


def traffic_from_world(
    world: World,
    *,
    n_impressions: int,
    seed: int = 0,
    creatives_per_product: int = 4,
    grouper: ProductAwareGrouper | None = None,
    learn: bool = True,
    on_event: Callable[[], None] | None = None,
) -> tuple[TrafficLog, ProductAwareGrouper]:
    """Simulate ``n_impressions`` of random creatives in ``world`` and log them for the learner.

    Pass the ``grouper`` of an earlier log and ``learn=False`` to label a
    held-out log with the same groups.
    """
    events = generate_events(world, seed, n_impressions=n_impressions, creatives_per_product=creatives_per_product)
    log, grouper = traffic_from_events(
        events, world_products(world), grouper=grouper, learn=learn, on_event=on_event
    )
    log.meta.update({"source": "world", "world": world.name, "world_file": world.source, "seed": seed,
                     "impressions": n_impressions, "creatives_per_product": creatives_per_product})
    return log, grouper


def read_event_file(path: str | Path) -> tuple[list[Impression | Click], list[str]]:
    """Events from a JSON-lines file of wire events (one impression or click a line) and the bad lines' reasons."""
    events: list[Impression | Click] = []
    bad: list[str] = []
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                events.append(parse_event(line.strip()))
            except EventError as exc:
                bad.append(f"{path}:{number}: {exc}")
    return events, bad


def write_event_file(path: str | Path, events: Iterable[Impression | Click]) -> int:
    """Write events as JSON lines (the wire form); returns how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for event in events:
            out.write(json.dumps(event.model_dump(mode="json", by_alias=True)) + "\n")
            count += 1
    return count
