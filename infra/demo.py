"""The embedded demo: broker, simulated ad traffic, the events read back, a CTR table."""

from __future__ import annotations

import heapq
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.settings import Settings
from infra.world.simulate import generate_events
from infra.world.world import World
from streams.events import Click, EventError, Impression, parse_event

EXAMPLE_WORLDS = Path(__file__).parent / "world" / "examples"
DEFAULT_WORLD = EXAMPLE_WORLDS / "world_a.yaml"


@dataclass
class CategoryCounts:
    """Impressions and clicks of one category."""

    impressions: int = 0
    clicks: int = 0

    @property
    def ctr(self) -> float:
        """Clicks per impression (0 when nothing was shown)."""
        return self.clicks / self.impressions if self.impressions else 0.0


def world_path(settings: Settings, override: Path | None = None) -> Path:
    """The world file to use: the override, the settings' world, or example world A."""
    return override or settings.simulator.world or DEFAULT_WORLD


def simulated_events(
    world: World, settings: Settings, *, seed: int, rate: float, duration_s: float, start_ts_ms: int | None
) -> Iterator[Impression | Click]:
    """The simulator's events; ``start_ts_ms`` None stamps them from the current time."""
    start = start_ts_ms if start_ts_ms is not None else int(time.time() * 1000)
    return generate_events(
        world,
        seed,
        duration_s=duration_s,
        rate=rate,
        creatives_per_product=settings.simulator.creatives_per_product,
        start_ts_ms=start,
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


def ctr_by_category(values: Iterable[bytes], only_ids: set[str] | None = None) -> dict[str, CategoryCounts]:
    """Per-category impressions, clicks and CTR of wire events (clicks joined to impressions by id).

    ``only_ids`` restricts the count to impressions with those ids (and their clicks).
    """
    categories: dict[str, CategoryCounts] = defaultdict(CategoryCounts)
    category_of: dict[str, str] = {}
    clicks: list[Click] = []
    for value in values:
        try:
            event = parse_event(value)
        except EventError:
            continue
        if isinstance(event, Impression):
            if only_ids is None or event.event_id in only_ids:
                category_of[event.event_id] = event.category
                categories[event.category].impressions += 1
        else:
            clicks.append(event)
    for click in clicks:
        category = category_of.get(click.impression_id)
        if category is not None:
            categories[category].clicks += 1
    return dict(sorted(categories.items()))
