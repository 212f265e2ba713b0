"""Deterministic template renderer: a styled background, the product, a copy banner.

The embedded default renderer (docs/architecture.md §4). It draws exactly what the
creative prompt says, with Pillow and numpy only, so the same prompt and
product image always give the same bytes.

What each prompt field does:

* ``background``: ``solid`` (primary), ``gradient`` (primary at the top to
  secondary at the bottom), ``stripes`` (diagonal, alternating), ``dots``
  (secondary dots on primary), ``spotlight`` (secondary centre fading to a
  primary rim), ``split`` (primary left half, secondary right half).
* ``palette``: the two colours of :data:`infra.contracts.prompt.COLORS`.
* ``position`` and ``scale``: the product's longer side is ``scale`` × image
  side; it is centred, or placed against one side at a margin of 6 %.
* ``copy``: a full-width banner (16 % high) at the bottom (at the top when the
  product sits at the bottom), in dark or light grey chosen to contrast with
  the background beneath, a 1-pixel rule in the text colour on its inner
  edge, and the text in PIL's default font.
* ``style`` words change the palette (``bright`` lightens, ``dark`` darkens,
  ``soft`` desaturates and lightens a little, ``vivid`` saturates,
  ``minimal`` pulls the secondary towards the primary) or the drawing
  (``bold``: wider pattern, thicker text; ``playful``: finer pattern, larger
  dots; ``luxury``: a thin frame in the secondary colour, gold text).
  Background pixels therefore always lie on the RGB segment between the two
  styled palette colours.

>>> from PIL import Image
>>> from infra.contracts.prompt import parse_prompt
>>> prompt = parse_prompt('background=dots; palette=red,white; position=left; scale=0.5; copy="Sale"; style=bold')
>>> product = Image.new("RGBA", (40, 80), (20, 120, 60, 255))
>>> image = TemplateRenderer(size=128).render(prompt, product)
>>> image.size, image.mode
((128, 128), 'RGB')
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from infra.contracts.prompt import COLORS, CreativePrompt

MARGIN = 0.06
"""Gap between a side-placed product and the image edge, as a fraction of the side."""
BANNER_HEIGHT = 0.16
"""Height of the copy banner, as a fraction of the side."""
BANNER_DARK = (24, 24, 24)
BANNER_LIGHT = (240, 240, 240)
GOLD = (212, 175, 55)

_LUMA = np.array([0.299, 0.587, 0.114])


class TemplateRenderer:
    """Render creative prompts as square RGB ad images with Pillow.

    Parameters
    ----------
    size
        Side of the square output image in pixels.

    Examples
    --------
    >>> from PIL import Image
    >>> from infra.contracts.prompt import parse_prompt
    >>> renderer = TemplateRenderer(size=64)
    >>> prompt = parse_prompt('background=solid; palette=blue,white; position=center; scale=0.5; copy=""; style=')
    >>> image = renderer.render(prompt, Image.new("RGBA", (10, 10), (255, 0, 0, 255)))
    >>> image.getpixel((32, 32)), image.getpixel((2, 2))
    ((255, 0, 0), (33, 99, 214))
    """

    def __init__(self, size: int = 256) -> None:
        if size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {size}")
        self.size = size

    def render(self, prompt: CreativePrompt, product_image: Image.Image) -> Image.Image:
        """Draw the ad image for ``prompt`` around ``product_image`` (RGBA, transparent background)."""
        canvas = self.background(prompt)
        box = self.product_box(prompt, product_image)
        product = _crop_to_content(product_image).resize(
            (box[2] - box[0], box[3] - box[1]), Image.Resampling.BICUBIC
        )
        canvas.paste(product, box[:2], product)
        if prompt.copy:
            self._draw_banner(canvas, prompt)
        return canvas

    def background(self, prompt: CreativePrompt) -> Image.Image:
        """The styled background alone (RGB), as :meth:`render` draws it under the product."""
        primary, secondary = styled_palette(prompt)
        weight = _pattern(prompt.background, frozenset(prompt.style), self.size)
        pixels = primary[None, None, :] * (1.0 - weight[..., None]) + secondary[None, None, :] * weight[..., None]
        image = Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
        if "luxury" in prompt.style:
            frame = max(2, self.size // 64)
            ImageDraw.Draw(image).rectangle(
                (0, 0, self.size - 1, self.size - 1), outline=_rgb(secondary), width=frame
            )
        return image

    def product_box(self, prompt: CreativePrompt, product_image: Image.Image) -> tuple[int, int, int, int]:
        """Pixel box ``(left, top, right, bottom)`` the product occupies (right/bottom exclusive)."""
        content = _content_size(product_image)
        longest = max(1, round(prompt.scale * self.size))
        ratio = longest / max(content)
        width = max(1, round(content[0] * ratio))
        height = max(1, round(content[1] * ratio))
        margin = round(MARGIN * self.size)
        left = (self.size - width) // 2
        top = (self.size - height) // 2
        if prompt.position == "left":
            left = margin
        elif prompt.position == "right":
            left = self.size - margin - width
        elif prompt.position == "top":
            top = margin
        elif prompt.position == "bottom":
            top = self.size - margin - height
        return left, top, left + width, top + height

    def banner_rows(self, prompt: CreativePrompt) -> tuple[int, int] | None:
        """Rows ``(top, bottom)`` (bottom exclusive) of the copy banner, or None without copy."""
        if not prompt.copy:
            return None
        height = max(4, round(BANNER_HEIGHT * self.size))
        if prompt.position == "bottom":
            return 0, height
        return self.size - height, self.size

    def _draw_banner(self, canvas: Image.Image, prompt: CreativePrompt) -> None:
        rows = self.banner_rows(prompt)
        assert rows is not None
        top, bottom = rows
        strip = np.asarray(canvas, dtype=np.float64)[top:bottom]
        light_beneath = float((strip @ _LUMA).mean()) > 110.0
        fill = BANNER_DARK if light_beneath else BANNER_LIGHT
        if "luxury" in prompt.style and light_beneath:
            text_colour = GOLD
        else:
            text_colour = BANNER_LIGHT if light_beneath else BANNER_DARK
        draw = ImageDraw.Draw(canvas)
        draw.rectangle((0, top, self.size - 1, bottom - 1), fill=fill)
        rule = top if top > 0 else bottom - 1  # 1-pixel rule on the inner edge, in the text colour
        draw.line((0, rule, self.size - 1, rule), fill=text_colour, width=1)
        height = bottom - top
        font = _fitting_font(prompt.copy, round(height * 0.62), round(self.size * 0.9))
        stroke = 1 if "bold" in prompt.style else 0
        draw.text(
            (self.size / 2, top + height / 2),
            prompt.copy,
            font=font,
            fill=text_colour,
            anchor="mm",
            stroke_width=stroke,
            stroke_fill=text_colour,
        )


def styled_palette(prompt: CreativePrompt) -> tuple[np.ndarray, np.ndarray]:
    """Primary and secondary colours (float RGB, 0–255) after the prompt's style words.

    >>> from infra.contracts.prompt import parse_prompt
    >>> p = parse_prompt('background=solid; palette=blue,white; position=center; scale=0.5; copy=""; style=dark')
    >>> [int(v) for v in styled_palette(p)[0]]
    [14, 44, 96]
    """
    colours = [np.array(COLORS[name], dtype=np.float64) for name in prompt.palette]
    style = set(prompt.style)
    if "minimal" in style:
        colours[1] = colours[0] + 0.5 * (colours[1] - colours[0])
    for index, colour in enumerate(colours):
        if "soft" in style:
            colour = _scale_saturation(colour, 0.5)
            colour = colour + 0.15 * (255.0 - colour)
        if "vivid" in style:
            colour = _scale_saturation(colour, 1.6)
        if "bright" in style:
            colour = colour + 0.4 * (255.0 - colour)
        if "dark" in style:
            colour = colour * 0.45
        colours[index] = np.clip(colour, 0.0, 255.0)
    return colours[0], colours[1]


def _scale_saturation(colour: np.ndarray, factor: float) -> np.ndarray:
    grey = float(colour @ _LUMA)
    return np.clip(grey + factor * (colour - grey), 0.0, 255.0)


def _pattern(background: str, style: frozenset[str], size: int) -> np.ndarray:
    """Per-pixel weight of the secondary colour (0 = primary, 1 = secondary)."""
    return _pattern_cached(background, "bold" in style, "playful" in style, size)


@lru_cache(maxsize=256)
def _pattern_cached(background: str, bold: bool, playful: bool, size: int) -> np.ndarray:
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    if background == "solid":
        weight = np.zeros((size, size))
    elif background == "gradient":
        weight = y.copy()
    elif background == "stripes":
        count = 5 if bold else 14 if playful else 8
        weight = (np.floor((x + y) * count) % 2).astype(np.float64)
    elif background == "dots":
        spacing = 1 / 10 if playful else 1 / 6
        radius = spacing * (0.38 if (bold or playful) else 0.25)
        dx = ((x + spacing / 2) % spacing) - spacing / 2  # dots on the grid lines, so the
        dy = ((y + spacing / 2) % spacing) - spacing / 2  # image border shows both colours
        weight = ((dx * dx + dy * dy) <= radius * radius).astype(np.float64)
    elif background == "spotlight":
        distance = np.hypot(x - 0.5, y - 0.5) / np.hypot(0.5, 0.5)
        weight = np.clip(1.0 - distance / 0.85, 0.0, 1.0)
    elif background == "split":
        weight = (x >= 0.5).astype(np.float64)
    else:  # pragma: no cover - CreativePrompt validates backgrounds
        raise ValueError(f"unknown background {background!r}")
    weight.flags.writeable = False
    return weight


def _content_size(image: Image.Image) -> tuple[int, int]:
    box = _content_box(image)
    return box[2] - box[0], box[3] - box[1]


def _content_box(image: Image.Image) -> tuple[int, int, int, int]:
    if image.mode == "RGBA":
        box = image.getchannel("A").getbbox()
        if box is not None:
            return box
    return 0, 0, image.width, image.height


def _crop_to_content(image: Image.Image) -> Image.Image:
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    return rgba.crop(_content_box(rgba))


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, size))


def _fitting_font(text: str, height: int, width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    size = max(6, height)
    font = _font(size)
    length = font.getlength(text)
    if length > width:
        size = max(6, int(size * width / length))
        font = _font(size)
    return font


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    return int(round(colour[0])), int(round(colour[1])), int(round(colour[2]))
