"""The creative prompt: what the G-MLLM writes and the renderer draws.

A prompt has a canonical one-line text form, fields in fixed order::

    background=gradient; palette=blue,white; position=left; scale=0.6; copy="Summer sale"; style=bold,minimal

:func:`parse_prompt` is strict: it accepts only the canonical form and raises
:class:`PromptError` naming the field and the allowed values otherwise.

>>> p = parse_prompt('background=dots; palette=red,white; position=center; scale=0.5; copy=""; style=')
>>> p.to_text() == 'background=dots; palette=red,white; position=center; scale=0.5; copy=""; style='
True
>>> p.attributes()["copy"]
'none'
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "stripes", "dots", "spotlight", "split")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "orange": (247, 127, 0),
    "yellow": (252, 191, 73),
    "green": (56, 176, 0),
    "teal": (0, 150, 136),
    "blue": (33, 99, 214),
    "navy": (20, 33, 61),
    "purple": (123, 44, 191),
    "pink": (255, 112, 166),
    "white": (245, 245, 245),
    "gray": (140, 140, 140),
    "black": (20, 20, 20),
    "beige": (230, 214, 180),
}
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
SCALES: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
STYLE_WORDS: tuple[str, ...] = ("minimal", "bold", "bright", "dark", "soft", "vivid", "luxury", "playful")
COPY_TEXTS: tuple[str, ...] = ("", "New", "Sale", "Best seller", "Free shipping", "Limited offer", "Top rated")
MAX_COPY_CHARS = 24
MAX_STYLE_WORDS = 3
FIELDS: tuple[str, ...] = ("background", "palette", "position", "scale", "copy", "style")

_COPY_RE = re.compile(r"^[A-Za-z0-9 %!.,'&+-]*$")


class PromptError(ValueError):
    """A prompt text or value is invalid; ``field`` names where, the message says the fix."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"prompt field {field!r}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class CreativePrompt:
    """A structured creative prompt (background, palette, layout, copy, style)."""

    background: str
    palette: tuple[str, str]
    position: str
    scale: float
    copy: str
    style: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_choice("background", self.background, BACKGROUNDS)
        if len(self.palette) != 2:
            raise PromptError("palette", f"needs exactly 2 colours (primary,secondary), got {len(self.palette)}")
        for colour in self.palette:
            _check_choice("palette", colour, tuple(COLORS))
        _check_choice("position", self.position, POSITIONS)
        if self.scale not in SCALES:
            raise PromptError("scale", f"{self.scale!r} is not one of {', '.join(map(str, SCALES))}")
        if len(self.copy) > MAX_COPY_CHARS or not _COPY_RE.match(self.copy):
            raise PromptError(
                "copy", f"{self.copy!r}: at most {MAX_COPY_CHARS} letters, digits, spaces or %!.,'&+-"
            )
        if len(self.style) > MAX_STYLE_WORDS or len(set(self.style)) != len(self.style):
            raise PromptError("style", f"at most {MAX_STYLE_WORDS} distinct words, got {list(self.style)}")
        for word in self.style:
            _check_choice("style", word, STYLE_WORDS)
        if list(self.style) != sorted(self.style):
            raise PromptError("style", f"words must be in alphabetical order: {','.join(sorted(self.style))}")

    def to_text(self) -> str:
        """The canonical text form (what the G-MLLM writes)."""
        return (
            f"background={self.background}; palette={self.palette[0]},{self.palette[1]}; "
            f"position={self.position}; scale={self.scale}; copy=\"{self.copy}\"; style={','.join(self.style)}"
        )

    def attributes(self) -> dict[str, str]:
        """Discrete visual attributes, for per-(group, attribute) CTR tables."""
        return {
            "background": self.background,
            "primary": self.palette[0],
            "secondary": self.palette[1],
            "position": self.position,
            "scale": str(self.scale),
            "copy": "yes" if self.copy else "none",
        }

    def attribute_tokens(self) -> tuple[str, ...]:
        """``name=value`` tokens of :meth:`attributes`, plus one ``style=word`` per style word."""
        return tuple(f"{k}={v}" for k, v in self.attributes().items()) + tuple(f"style={w}" for w in self.style)


def parse_prompt(text: str) -> CreativePrompt:
    """Parse the canonical text form; raise :class:`PromptError` naming the bad field."""
    parts = text.strip().split("; ")
    if len(parts) != len(FIELDS):
        raise PromptError("<prompt>", f"expected {len(FIELDS)} fields '{'; '.join(f + '=…' for f in FIELDS)}'")
    values: dict[str, str] = {}
    for expected, part in zip(FIELDS, parts):
        key, sep, value = part.partition("=")
        if not sep or key != expected:
            raise PromptError(expected, f"expected '{expected}=…' here, got {part!r}")
        values[key] = value
    copy = values["copy"]
    if len(copy) < 2 or not (copy.startswith('"') and copy.endswith('"')):
        raise PromptError("copy", f'must be in double quotes, e.g. copy="Sale" or copy="", got {copy!r}')
    try:
        scale = float(values["scale"])
    except ValueError:
        raise PromptError("scale", f"{values['scale']!r} is not a number; use one of {SCALES}") from None
    palette = tuple(values["palette"].split(","))
    style = tuple(values["style"].split(",")) if values["style"] else ()
    return CreativePrompt(
        background=values["background"],
        palette=palette,  # type: ignore[arg-type]
        position=values["position"],
        scale=scale,
        copy=copy[1:-1],
        style=style,
    )


def random_prompt(rng: random.Random) -> CreativePrompt:
    """A uniformly random valid prompt (the pre-model baseline and the oracle's search space)."""
    primary, secondary = rng.sample(sorted(COLORS), 2)
    style = tuple(sorted(rng.sample(STYLE_WORDS, rng.randint(0, MAX_STYLE_WORDS))))
    return CreativePrompt(
        background=rng.choice(BACKGROUNDS),
        palette=(primary, secondary),
        position=rng.choice(POSITIONS),
        scale=rng.choice(SCALES),
        copy=rng.choice(COPY_TEXTS),
        style=style,
    )


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PromptError(field, f"{value!r} is not one of {', '.join(allowed)}")
