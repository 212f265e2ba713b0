"""The simulated ad system pulls every creative from serving, as a real ad server would.

:class:`ServedChooser` is a :data:`sim.simulate.Chooser` that asks
:meth:`serving.client.CreativeClient.creative_for` for each impression and
hands the world the pixels that were served, so clicks follow from the
world's click model on the served image. It also counts what it showed, per
model version and group, for the demo's live display and summary.
"""

from __future__ import annotations

import io
import threading
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from PIL import Image

from infra.contracts.prompt import PromptError, parse_prompt
from learner.data import ProductRecord
from sim.logs import world_products
from sim.simulate import Shown
from sim.vision import visual_features
from sim.world import Product, User, World


@dataclass
class ServedCounts:
    """What the ad system showed: impressions per (model version, group), fallbacks, explorations."""

    impressions: Counter = field(default_factory=Counter)
    fallbacks: int = 0
    explored: int = 0
    reasons: Counter = field(default_factory=Counter)


class ServedChooser:
    """Pick each impression's creative with a serving client; see the module docstring.

    Parameters
    ----------
    world
        The simulated world (its products are the client's catalogue).
    client
        A :class:`serving.client.CreativeClient` (or anything with ``creative_for(user_id, product_id)``
        returning an object with ``png``, ``prompt``, ``model_version``, ``creative_id``, ``group_id``,
        ``explores``, ``fallback`` and ``reason``).
    """

    def __init__(self, world: World, client: object) -> None:
        self.world = world
        self.client = client
        self.counts = ServedCounts()
        self._features: dict[str, Mapping[str, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, user: User, product: Product) -> Shown:
        served = self.client.creative_for(user.id, product.id)  # type: ignore[attr-defined]
        try:
            prompt = parse_prompt(served.prompt)
        except PromptError:  # a served prompt always parses; a broken one is shown as the world renders it
            prompt = parse_prompt('background=solid; palette=white,gray; position=center; scale=0.6; copy=""; style=')
        key = f"{served.creative_id}:{product.id}"
        features = self._features.get(key)
        if features is None and served.png:
            side = self.world.spec.render_size  # the size the click model looks at
            image = Image.open(io.BytesIO(served.png)).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
            features = visual_features(image)
            self._features[key] = features
        with self._lock:
            self.counts.impressions[(served.model_version, served.group_id or "-")] += 1
            self.counts.fallbacks += bool(served.fallback)
            self.counts.explored += bool(served.explores)
            if served.fallback:
                self.counts.reasons[served.reason or "fallback"] += 1
        return Shown(served.creative_id, prompt, str(served.model_version), served.group_id, features)


def catalogue(world: World) -> dict[str, ProductRecord]:
    """The world's products as the serving client's catalogue (title, price, image)."""
    return world_products(world)


def served_share(counts: ServedCounts) -> dict[str, float]:
    """Share of impressions per model version."""
    per_version: dict[str, int] = defaultdict(int)
    for (version, _group), n in counts.impressions.items():
        per_version[version] += n
    total = sum(per_version.values())
    return {version: n / total for version, n in sorted(per_version.items())} if total else {}
