"""The simulated world: users, products with drawn images, hidden segments, a pixel click model.

A :class:`World` is built from a world file (``docs/world.md``). Everything in
it is a deterministic function of the file (its ``seed`` included):

* users with categorical attributes drawn from the configured distributions;
* per category, products with a title, a price and a procedurally drawn
  product image (RGBA cut-out: bottle, box, shoe or tube silhouette, shaded,
  in the product's colours);
* per category, the hidden segment of every user. ``P(segment | user) ∝
  prior · Π weight[attribute][user's value]``, with the priors calibrated so
  segments hold their ``share`` of users on average; each user's segment is
  drawn once from that posterior (the noise), so segments are mostly — not
  exactly — a function of the attributes;
* the click model: a creative is rendered with the template renderer, its
  pixels measured by :func:`sim.vision.visual_features`, and
  ``logit P(click) = logit(base_ctr) + Σ preference terms + user offset +
  product offset``; ``P = floor + (1 − floor) · sigmoid(logit)``.

>>> from pathlib import Path
>>> world = World.load(Path(__file__).parent / "examples" / "world_a.yaml")
>>> user = world.users[0]
>>> segment = world.segment_of(user, world.categories[0])
>>> segment.category == world.categories[0]
True
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

from sim.schema import (
    CategorySpec,
    Preference,
    SegmentSpec,
    ShiftSpec,
    WorldError,
    WorldSpec,
    load_spec,
    parse_spec,
)
from sim.vision import FEATURE_RANGES, visual_features
from serving.render.template import TemplateRenderer
from infra.contracts.prompt import CreativePrompt

PRODUCT_IMAGE_SIZE = 128
"""Side of the square canvas product images are drawn on."""
HUE_FULL_STRENGTH = 0.25
"""Colorfulness at which a hue preference takes full effect (greyer images count less)."""

__all__ = ["World", "User", "Product", "Segment", "WorldError", "preference_logit", "draw_product"]


@dataclass(frozen=True)
class User:
    """A simulated user: a stable id and categorical attributes."""

    id: str
    index: int
    attributes: Mapping[str, str]


@dataclass(frozen=True, eq=False)
class Product:
    """A simulated product with its drawn image (RGBA, transparent background)."""

    id: str
    index: int
    category: str
    title: str
    price: float
    image: Image.Image = field(repr=False)

    @property
    def attributes(self) -> dict[str, str | float]:
        """Product attributes as they travel in an impression."""
        return {"title": self.title, "price": self.price}


@dataclass(frozen=True, eq=False)
class Segment:
    """A hidden segment of one category: its taste, and how that taste shifts over time."""

    category: str
    name: str
    index: int
    share: float
    base_ctr: float
    preferences: Mapping[str, Preference]
    shifts: tuple[ShiftSpec, ...] = ()

    @property
    def key(self) -> str:
        """``category/name``, unique in a world."""
        return f"{self.category}/{self.name}"

    def phase(self, t_s: float) -> int:
        """How many preference shifts have happened by ``t_s`` seconds."""
        return sum(1 for shift in self.shifts if shift.at_s <= t_s)

    def taste(self, t_s: float = 0.0) -> tuple[float, Mapping[str, Preference]]:
        """``(base_ctr, preferences)`` in force at ``t_s`` seconds into a simulation."""
        base, preferences = self.base_ctr, self.preferences
        for shift in self.shifts[: self.phase(t_s)]:
            preferences = shift.preferences
            base = shift.base_ctr if shift.base_ctr is not None else base
        return base, preferences


class World:
    """A simulated population, catalogue and click model, built from a :class:`WorldSpec`.

    Parameters
    ----------
    spec
        The validated world description (see :func:`sim.schema.load_spec`).
    source
        Where the spec came from, for messages.
    """

    def __init__(self, spec: WorldSpec, source: str = "<spec>") -> None:
        self.spec = spec
        self.source = source
        self.name = spec.name
        self.renderer = TemplateRenderer(size=spec.render_size)
        self.categories: list[str] = [category.name for category in spec.categories]
        self.users, self._user_codes = self._draw_users()
        self.products: dict[str, list[Product]] = {
            category.name: self._draw_products(category) for category in spec.categories
        }
        self.segments: dict[str, list[Segment]] = {
            category.name: [_segment(category.name, s, segment) for s, segment in enumerate(category.segments)]
            for category in spec.categories
        }
        self._membership: dict[str, np.ndarray] = {
            category.name: self._assign_segments(c, category) for c, category in enumerate(spec.categories)
        }
        noise = spec.click_noise
        self.user_offsets = np.random.default_rng([spec.seed, 3]).normal(0.0, noise.user_sd, len(self.users))
        count = sum(len(products) for products in self.products.values())
        product_offsets = np.random.default_rng([spec.seed, 4]).normal(0.0, noise.product_sd, count)
        self.product_offsets = {
            product.id: float(offset) for product, offset in zip(self.all_products(), product_offsets)
        }
        self._features: dict[tuple[str, str], dict[str, float]] = {}

    @classmethod
    def load(cls, path: str | Path) -> World:
        """Load and validate a world file; raise :class:`WorldError` naming each bad field."""
        return cls(load_spec(path), source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, object], source: str = "<dict>") -> World:
        """Build a world from already-parsed YAML data."""
        return cls(parse_spec(dict(data), source), source=source)

    def all_products(self) -> list[Product]:
        """Every product, category by category, in a stable order."""
        return [product for category in self.categories for product in self.products[category]]

    def segment_of(self, user: User, category: str) -> Segment:
        """The hidden segment ``user`` belongs to for products of ``category``."""
        return self.segments[category][int(self._membership[category][user.index])]

    def segment(self, category: str, name: str) -> Segment:
        """Look a segment up by category and name."""
        for segment in self.segments[category]:
            if segment.name == name:
                return segment
        raise KeyError(f"no segment {name!r} in category {category!r}")

    def members(self, segment: Segment) -> list[User]:
        """The users in ``segment``."""
        codes = self._membership[segment.category]
        return [self.users[int(i)] for i in np.flatnonzero(codes == segment.index)]

    def segment_shares(self, category: str) -> dict[str, float]:
        """Realised fraction of users in each segment of ``category``."""
        counts = np.bincount(self._membership[category], minlength=len(self.segments[category]))
        return {seg.name: float(n) / len(self.users) for seg, n in zip(self.segments[category], counts)}

    def render(self, product: Product, prompt: CreativePrompt) -> Image.Image:
        """The ad image of ``prompt`` for ``product``, as the click model sees it."""
        return self.renderer.render(prompt, product.image)

    def features(self, product: Product, prompt: CreativePrompt) -> dict[str, float]:
        """Visual features of the rendered creative (cached per product and prompt)."""
        key = (product.id, prompt.to_text())
        cached = self._features.get(key)
        if cached is None:
            cached = visual_features(self.render(product, prompt))
            self._features[key] = cached
        return cached

    def click_logit(self, segment: Segment, features: Mapping[str, float], t_s: float = 0.0) -> float:
        """Logit of the click probability of ``segment``'s average user (before offsets and floor)."""
        base, preferences = segment.taste(t_s)
        return math.log(base / (1.0 - base)) + preference_logit(preferences, features)

    def click_probability(
        self, segment: Segment, features: Mapping[str, float], t_s: float = 0.0, offset: float = 0.0
    ) -> float:
        """Probability that a user of ``segment`` clicks a creative with these visual ``features``.

        ``t_s`` is the time into the simulation (preference shifts), ``offset``
        a user's plus a product's own logit offset.
        """
        return self.probability(self.click_logit(segment, features, t_s) + offset)

    def probability(self, logit: float) -> float:
        """Map a click logit to a probability, with the accidental-click floor."""
        floor = self.spec.click_noise.floor
        return floor + (1.0 - floor) / (1.0 + math.exp(-logit))

    def _draw_users(self) -> tuple[list[User], np.ndarray]:
        spec = self.spec.users
        rng = np.random.default_rng([self.spec.seed, 1])
        names = list(spec.attributes)
        codes = np.stack(
            [rng.choice(len(a.values), size=spec.count, p=a.weights()) for a in spec.attributes.values()], axis=1
        )
        values = [spec.attributes[name].values for name in names]
        users = [
            User(
                id=f"u{index:06d}",
                index=index,
                attributes={name: values[a][code] for a, (name, code) in enumerate(zip(names, row))},
            )
            for index, row in enumerate(codes.tolist())
        ]
        return users, codes

    def _draw_products(self, category: CategorySpec) -> list[Product]:
        products = []
        for index in range(category.products):
            rng = random.Random(f"product:{self.spec.seed}:{category.name}:{index}")
            words = rng.sample(category.title_words, min(2, len(category.title_words)))
            low, high = category.price
            products.append(
                Product(
                    id=f"{category.name}-{index:04d}",
                    index=index,
                    category=category.name,
                    title=" ".join([*words, category.name]).capitalize(),
                    price=round(low + (high - low) * rng.random(), 2),
                    image=draw_product(category.shape, rng),
                )
            )
        return products

    def _assign_segments(self, c: int, category: CategorySpec) -> np.ndarray:
        attributes = self.spec.users.attributes
        names = list(attributes)
        log_weights = np.zeros((len(self.users), len(category.segments)))
        for s, segment in enumerate(category.segments):
            for attribute, weights in segment.membership.items():
                values = attributes[attribute].values
                table = np.log([weights.get(v, self.spec.membership_noise) for v in values])
                log_weights[:, s] += table[self._user_codes[:, names.index(attribute)]]
        shares = np.array([segment.share for segment in category.segments])
        shares = shares / shares.sum()
        log_prior = np.log(shares)
        for _ in range(200):  # calibrate priors so that mean posterior = share
            posterior = _softmax(log_prior + log_weights)
            realised = posterior.mean(axis=0)
            if np.abs(realised - shares).max() < 1e-4:
                break
            log_prior += np.log(shares / np.maximum(realised, 1e-12))
        posterior = _softmax(log_prior + log_weights)
        draws = np.random.default_rng([self.spec.seed, 2, c]).random(len(self.users))
        cumulative = np.cumsum(posterior, axis=1)
        return np.minimum((cumulative < draws[:, None]).sum(axis=1), len(category.segments) - 1)


def preference_logit(preferences: Mapping[str, Preference], features: Mapping[str, float]) -> float:
    """Sum of the preference terms of a segment for a creative's visual features.

    Each feature is normalised by its nominal range ``[lo, hi]``
    (:data:`sim.vision.FEATURE_RANGES`) to ``u`` in [0, 1]. Without a
    target the term is ``weight · (u − ½)``; with one (``t`` normalised the
    same way) it is ``weight · (½ − |u − t|)``. Hue is circular:
    ``weight · ½ · cos(hue − target) · min(1, colorfulness / 0.25)``.

    >>> from sim.schema import Preference
    >>> preference_logit({"copy": Preference(weight=2.0)}, {"copy": 1.0})
    1.0
    """
    total = 0.0
    for feature, preference in preferences.items():
        value = features[feature]
        if feature == "hue":
            target = preference.target or 0.0
            strength = min(1.0, features["colorfulness"] / HUE_FULL_STRENGTH)
            total += preference.weight * 0.5 * math.cos(math.radians(value - target)) * strength
            continue
        low, high = FEATURE_RANGES[feature]
        u = min(1.0, max(0.0, (value - low) / (high - low)))
        if preference.target is None:
            total += preference.weight * (u - 0.5)
        else:
            t = (preference.target - low) / (high - low)
            total += preference.weight * (0.5 - abs(u - t))
    return total


def draw_product(shape: str, rng: random.Random, size: int = PRODUCT_IMAGE_SIZE) -> Image.Image:
    """Draw a product cut-out (RGBA, transparent background) of ``shape`` in random colours.

    Parameters
    ----------
    shape
        ``bottle``, ``box``, ``shoe`` or ``tube``.
    rng
        Source of the colours and proportions (same state, same image).
    size
        Side of the square canvas.

    Examples
    --------
    >>> image = draw_product("bottle", random.Random(0))
    >>> image.mode, image.size, image.getpixel((0, 0))[3]
    ('RGBA', (128, 128), 0)
    """
    hue = rng.random()
    body = _hsv(hue, rng.uniform(0.55, 0.9), rng.uniform(0.6, 0.9))
    colours = {
        "body": body,
        "accent": rng.choice([_hsv((hue + 0.5) % 1.0, 0.7, 0.85), (245, 245, 240), (30, 30, 30), (212, 175, 55)]),
        "lighter": tuple(min(255, int(v * 1.25 + 20)) for v in body),
        "darker": tuple(int(v * 0.7) for v in body),
    }
    outline = tuple(int(v * 0.35) for v in body)
    parts = _shape_parts(shape, rng.uniform(-0.05, 0.05))
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    width = max(1, size // 64)
    for kind, points, colour, outlined in parts:
        xy = [v * size for v in points]
        edge = {"outline": outline, "width": width} if outlined else {}
        if kind == "rect":
            draw.rectangle(xy, fill=colours[colour], **edge)
        elif kind == "round":
            draw.rounded_rectangle(xy, radius=0.06 * size, fill=colours[colour], **edge)
        elif kind == "poly":
            draw.polygon(xy, fill=colours[colour], **edge)
        else:
            draw.line(xy, fill=colours[colour], width=width + 1)
    return _shade(canvas)


Part = tuple[str, list[float], str, bool]


def _shape_parts(shape: str, stretch: float) -> list[Part]:
    """Drawing primitives ``(kind, flat xy in canvas fractions, colour role, outlined)`` of a shape."""
    if shape == "bottle":
        lo, hi = 0.28 - stretch, 0.72 + stretch
        return [
            ("poly", [lo, 0.44, 0.42, 0.26, 0.58, 0.26, hi, 0.44], "body", True),
            ("round", [lo, 0.38, hi, 0.96], "body", True),
            ("rect", [0.42, 0.16, 0.58, 0.28], "body", True),
            ("rect", [0.40, 0.04, 0.60, 0.17], "accent", True),
            ("rect", [lo + 0.03, 0.56, hi - 0.03, 0.76], "lighter", False),
        ]
    if shape == "tube":
        lo, hi = 0.34 - stretch / 2, 0.66 + stretch / 2
        return [
            ("rect", [lo, 0.55, hi, 0.97], "accent", True),
            ("rect", [lo + 0.04, 0.42, hi - 0.04, 0.56], "darker", True),
            ("poly", [lo + 0.08, 0.43, lo + 0.08, 0.2, hi - 0.08, 0.08, hi - 0.08, 0.43], "body", True),
        ]
    if shape == "box":
        top = 0.3 + stretch
        return [
            ("rect", [0.1, top, 0.7, 0.94], "body", True),
            ("poly", [0.1, top, 0.3, top - 0.18, 0.9, top - 0.18, 0.7, top], "lighter", True),
            ("poly", [0.7, top, 0.9, top - 0.18, 0.9, 0.76, 0.7, 0.94], "darker", True),
            ("rect", [0.1, 0.55, 0.7, 0.7], "accent", False),
        ]
    if shape == "shoe":
        heel = 0.42 + stretch
        upper = [0.06, 0.64, 0.1, heel, 0.3, heel + 0.02, 0.44, 0.28, 0.6, 0.26, 0.66, 0.46, 0.9, 0.55, 0.96, 0.68]
        laces: list[Part] = [
            ("line", [0.46 + 0.06 * k, 0.34 + 0.05 * k, 0.54 + 0.06 * k, 0.38 + 0.05 * k], "lighter", False)
            for k in range(3)
        ]
        sole: Part = ("round", [0.04, 0.66, 0.97, 0.78], "accent", True)
        return [("poly", [*upper, 0.06, 0.7], "body", True), sole, *laces]
    raise ValueError(f"unknown product shape {shape!r}; use bottle, box, shoe or tube")


def _shade(image: Image.Image) -> Image.Image:
    """Cylindrical shading: lighter in the middle, darker at the left and right."""
    pixels = np.asarray(image, dtype=np.float64).copy()
    size = pixels.shape[1]
    x = (np.arange(size) + 0.5) / size
    factor = 0.7 + 0.4 * np.sin(np.pi * x)
    pixels[..., :3] = np.clip(pixels[..., :3] * factor[None, :, None], 0, 255)
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGBA")


def _hsv(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _segment(category: str, index: int, spec: SegmentSpec) -> Segment:
    return Segment(
        category=category,
        name=spec.name,
        index=index,
        share=spec.share,
        base_ctr=spec.base_ctr,
        preferences=dict(spec.preferences),
        shifts=tuple(spec.shifts),
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
