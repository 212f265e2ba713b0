"""The world file: a YAML description of simulated users, products and their hidden tastes.

:func:`load_spec` reads and validates a world file. Every problem is reported,
one line each, as ``world FILE: field.path: message`` in a :class:`WorldError`.
The full schema, with an example, is documented in ``docs/world.md``.

>>> spec = parse_spec({
...     "name": "tiny", "seed": 1,
...     "users": {"count": 10, "attributes": {"age_band": {"values": ["young", "old"]}}},
...     "categories": [{"name": "mugs", "products": 2, "price": [5, 9], "title_words": ["mug"],
...         "segments": [{"name": "all", "share": 1.0, "base_ctr": 0.05,
...                       "preferences": {"brightness": {"weight": 1.0}}}]}]})
>>> spec.categories[0].segments[0].preferences["brightness"].target is None
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from sim.vision import FEATURE_RANGES

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,48}$")]
Value = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.+<>/-][A-Za-z0-9_.+<>/ -]{0,63}$")]
FeatureName = Literal[
    "hue",
    "colorfulness",
    "saturation",
    "brightness",
    "contrast",
    "edge_density",
    "copy",
    "product_area",
    "product_x",
    "product_y",
]
Shape = Literal["bottle", "box", "shoe", "tube"]


class WorldError(ValueError):
    """A world file is missing or invalid; ``problems`` holds one ``world FILE: path: message`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttributeSpec(_Spec):
    """A categorical user attribute: its values and how often each occurs."""

    values: list[Value] = Field(min_length=2, description="Possible values.")
    probabilities: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, description="Probability of each value (same order, sums to 1); default uniform."
    )

    @model_validator(mode="after")
    def _check(self) -> AttributeSpec:
        if len(set(self.values)) != len(self.values):
            raise ValueError("values must be distinct")
        if self.probabilities is not None:
            if len(self.probabilities) != len(self.values):
                raise ValueError(
                    f"probabilities has {len(self.probabilities)} entries for {len(self.values)} values"
                )
            if abs(sum(self.probabilities) - 1.0) > 1e-6:
                raise ValueError(f"probabilities must sum to 1, they sum to {sum(self.probabilities):.6g}")
        return self

    def weights(self) -> list[float]:
        """Probability of each value, in ``values`` order."""
        if self.probabilities is None:
            return [1.0 / len(self.values)] * len(self.values)
        return list(self.probabilities)


class UsersSpec(_Spec):
    """The user population."""

    count: int = Field(ge=1, le=1_000_000, description="Number of users.")
    attributes: dict[Name, AttributeSpec] = Field(min_length=1, description="Attribute name to spec.")


class Preference(_Spec):
    """How much a segment likes one visual feature (see docs/world.md for the formula)."""

    weight: float = Field(ge=-20, le=20, description="Logit change across the feature's nominal range.")
    target: float | None = Field(None, description="Preferred value; without it, more is better (weight > 0).")


Preferences = dict[FeatureName, Preference]


class ShiftSpec(_Spec):
    """From ``at_s`` seconds into a simulation on, a segment's tastes are different."""

    at_s: float = Field(ge=0, description="Seconds after the start of the simulation.")
    preferences: Preferences = Field(description="Replaces the segment's preferences.")
    base_ctr: float | None = Field(None, gt=0, lt=1, description="Replaces base_ctr when set.")


class SegmentSpec(_Spec):
    """A hidden group of users of one category with its own taste in creatives."""

    name: Name
    share: float = Field(gt=0, le=1, description="Expected fraction of users in this segment.")
    membership: dict[Name, dict[Value, Annotated[float, Field(gt=0)]]] = Field(
        default_factory=dict,
        description="attribute -> value -> relative weight; unlisted values weigh membership_noise.",
    )
    base_ctr: float = Field(gt=0, lt=1, description="CTR of a creative at every preference's neutral point.")
    preferences: Preferences = Field(default_factory=dict)
    shifts: list[ShiftSpec] = Field(default_factory=list, description="Later changes of taste, by time.")


class CategorySpec(_Spec):
    """A product category, its products and its hidden segments."""

    name: Name
    products: int = Field(ge=1, le=10_000, description="Number of products.")
    price: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        description="[low, high] price range."
    )
    title_words: list[Annotated[str, StringConstraints(min_length=1, max_length=24)]] = Field(min_length=1)
    shape: Shape = Field("box", description="Silhouette of the drawn product images.")
    segments: list[SegmentSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> CategorySpec:
        if self.price[0] > self.price[1]:
            raise ValueError(f"price: low {self.price[0]} is above high {self.price[1]}")
        return self


class ClickNoise(_Spec):
    """Randomness of clicks beyond the segment's taste."""

    floor: float = Field(0.0, ge=0, lt=0.5, description="Probability of an accidental click.")
    user_sd: float = Field(0.0, ge=0, le=5, description="Sd of each user's own logit offset.")
    product_sd: float = Field(0.0, ge=0, le=5, description="Sd of each product's own logit offset.")


class WorldSpec(_Spec):
    """A whole simulated world (the root of the YAML file)."""

    name: Name
    seed: int = Field(description="Seeds users, products and memberships.")
    render_size: int = Field(128, ge=32, le=1024, description="Side of the images the click model looks at.")
    membership_noise: float = Field(
        0.05, gt=0, le=1, description="Weight of attribute values a segment's membership does not list."
    )
    users: UsersSpec
    categories: list[CategorySpec] = Field(min_length=1)
    click_noise: ClickNoise = ClickNoise()


def load_spec(path: str | Path) -> WorldSpec:
    """Read and validate the world file at ``path``; raise :class:`WorldError` listing every problem."""
    file = Path(path)
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorldError([f"world {source}: cannot read file ({exc.strerror or exc})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WorldError([f"world {source}: not valid YAML: {' '.join(str(exc).split())}"]) from None
    return parse_spec(data, source)


def parse_spec(data: Any, source: str = "<dict>") -> WorldSpec:
    """Validate already-parsed YAML data; raise :class:`WorldError` listing every problem."""
    if not isinstance(data, dict):
        raise WorldError([f"world {source}: <root>: must be a mapping with name, seed, users and categories"])
    try:
        spec = WorldSpec.model_validate(data)
    except ValidationError as exc:
        raise WorldError(_describe(exc, source)) from None
    problems = [f"world {source}: {line}" for line in _cross_check(spec)]
    if problems:
        raise WorldError(problems)
    return spec


def _describe(exc: ValidationError, source: str) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"] if part != "[key]") or "<root>"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field; remove it (see docs/world.md for the schema)"
        elif err["type"] == "missing":
            message = "missing; this field is required"
        got = err.get("input")
        got_text = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f" (got {got!r})"
        lines.append(f"world {source}: {field}: {message}{got_text}")
    return lines


def _cross_check(spec: WorldSpec) -> list[str]:
    """Rules that span fields: names unique, membership names known, shares sum to 1, targets in range."""
    problems: list[str] = []
    attributes = spec.users.attributes
    seen_categories: set[str] = set()
    for c, category in enumerate(spec.categories):
        where = f"categories.{c}"
        if category.name in seen_categories:
            problems.append(f"{where}.name: category {category.name!r} is defined twice")
        seen_categories.add(category.name)
        total = sum(segment.share for segment in category.segments)
        if abs(total - 1.0) > 0.01:
            problems.append(f"{where}.segments: shares must sum to 1, they sum to {total:.4g}")
        seen_segments: set[str] = set()
        for s, segment in enumerate(category.segments):
            at = f"{where}.segments.{s}"
            if segment.name in seen_segments:
                problems.append(f"{at}.name: segment {segment.name!r} is defined twice in {category.name!r}")
            seen_segments.add(segment.name)
            for attribute, weights in segment.membership.items():
                if attribute not in attributes:
                    problems.append(
                        f"{at}.membership.{attribute}: not a user attribute; use one of {', '.join(attributes)}"
                    )
                    continue
                for value in weights:
                    if value not in attributes[attribute].values:
                        allowed = ", ".join(attributes[attribute].values)
                        problems.append(
                            f"{at}.membership.{attribute}.{value}: not a value of {attribute}; use one of {allowed}"
                        )
            problems += _check_preferences(f"{at}.preferences", segment.preferences)
            last = -1.0
            for k, shift in enumerate(segment.shifts):
                if shift.at_s <= last:
                    problems.append(f"{at}.shifts.{k}.at_s: shifts must be in increasing time order")
                last = shift.at_s
                problems += _check_preferences(f"{at}.shifts.{k}.preferences", shift.preferences)
    return problems


def _check_preferences(where: str, preferences: Preferences) -> list[str]:
    problems = []
    for feature, preference in preferences.items():
        if preference.target is None:
            if feature == "hue":
                problems.append(f"{where}.hue.target: missing; a hue preference needs a target hue in degrees")
            continue
        low, high = FEATURE_RANGES[feature]
        if feature == "hue":
            if not 0.0 <= preference.target < 360.0:
                problems.append(f"{where}.hue.target: degrees in [0, 360), got {preference.target}")
        elif not low <= preference.target <= high:
            problems.append(f"{where}.{feature}.target: must lie in [{low}, {high}], got {preference.target}")
    return problems
