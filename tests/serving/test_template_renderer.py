"""The template renderer: deterministic, sized as asked, and faithful to the prompt's layout and style."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.render.base import Renderer
from serving.render.template import TemplateRenderer
from infra.contracts.prompt import COLORS, CreativePrompt, parse_prompt, random_prompt

RED = (230, 20, 20)


def _prompt(
    background: str = "solid",
    palette: tuple[str, str] = ("white", "gray"),
    position: str = "center",
    scale: float = 0.5,
    copy: str = "",
    style: tuple[str, ...] = (),
) -> CreativePrompt:
    return CreativePrompt(background, palette, position, scale, copy, style)


def _product() -> Image.Image:
    """An opaque red square inside a transparent margin."""
    image = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (40, 40), (*RED, 255)), (10, 10))
    return image


def _red_mask(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.int16)
    return (np.abs(pixels - np.array(RED)).max(axis=-1) < 8)


def _luma(image: Image.Image) -> float:
    return float((np.asarray(image, dtype=np.float64) @ [0.299, 0.587, 0.114]).mean())


def test_is_a_renderer() -> None:
    assert isinstance(TemplateRenderer(), Renderer)


def test_same_inputs_give_identical_bytes() -> None:
    rng = random.Random(3)
    for _ in range(10):
        prompt = random_prompt(rng)
        first = TemplateRenderer(96).render(prompt, _product())
        second = TemplateRenderer(96).render(parse_prompt(prompt.to_text()), _product())
        assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize("size", [32, 100, 256])
def test_size_is_configurable(size: int) -> None:
    image = TemplateRenderer(size).render(_prompt(copy="Sale"), _product())
    assert image.size == (size, size) and image.mode == "RGB"


def test_rejects_tiny_size() -> None:
    with pytest.raises(ValueError, match="size"):
        TemplateRenderer(8)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(16, 80))
def test_any_valid_prompt_renders(seed: int, size: int) -> None:
    prompt = random_prompt(random.Random(seed))
    image = TemplateRenderer(size).render(prompt, _product())
    assert image.size == (size, size) and image.mode == "RGB"


def test_scale_sets_product_size() -> None:
    renderer = TemplateRenderer(200)
    sides = []
    for scale in (0.4, 0.6, 0.8):
        mask = _red_mask(renderer.render(_prompt(scale=scale), _product()))
        rows, cols = np.nonzero(mask)
        sides.append(cols.max() - cols.min() + 1)
        # The product's opaque content (its alpha box) spans scale × side.
        assert abs((cols.max() - cols.min() + 1) - scale * 200) <= 2
        assert abs((rows.max() - rows.min() + 1) - scale * 200) <= 2
    assert sides[0] < sides[1] < sides[2]


def test_position_places_product() -> None:
    renderer = TemplateRenderer(200)
    centroids = {}
    for position in ("center", "left", "right", "top", "bottom"):
        rows, cols = np.nonzero(_red_mask(renderer.render(_prompt(position=position, scale=0.4), _product())))
        centroids[position] = (cols.mean() / 200, rows.mean() / 200)
    assert centroids["center"] == pytest.approx((0.5, 0.5), abs=0.01)
    assert centroids["left"][0] < 0.3 < 0.7 < centroids["right"][0]
    assert centroids["top"][1] < 0.3 < 0.7 < centroids["bottom"][1]
    assert centroids["left"][1] == pytest.approx(0.5, abs=0.01)
    assert centroids["top"][0] == pytest.approx(0.5, abs=0.01)


def test_transparent_parts_of_the_product_show_the_background() -> None:
    image = TemplateRenderer(200).render(_prompt(palette=("blue", "white"), scale=0.8), _product())
    box = TemplateRenderer(200).product_box(_prompt(scale=0.8), _product())
    assert image.getpixel((box[0] - 1, box[1] - 1)) == COLORS["blue"]
    assert image.getpixel((100, 100)) == RED


def test_copy_draws_a_banner_with_text() -> None:
    renderer = TemplateRenderer(128)
    plain = np.asarray(renderer.render(_prompt(), _product()), dtype=np.int16)
    with_copy = np.asarray(renderer.render(_prompt(copy="Free shipping"), _product()), dtype=np.int16)
    changed_rows = np.flatnonzero(np.abs(with_copy - plain).max(axis=(1, 2)) > 0)
    top, bottom = renderer.banner_rows(_prompt(copy="Free shipping"))  # type: ignore[misc]
    assert bottom == 128 and changed_rows.min() >= top
    band = with_copy[top:bottom]
    assert len(np.unique(band.reshape(-1, 3), axis=0)) > 3  # fill, rule and anti-aliased text
    # Product at the bottom: the banner moves to the top.
    assert renderer.banner_rows(_prompt(copy="Sale", position="bottom")) == (0, round(0.16 * 128))


def test_backgrounds_use_the_palette() -> None:
    renderer = TemplateRenderer(100)
    blue, yellow = COLORS["blue"], COLORS["yellow"]

    def bg(background: str) -> Image.Image:
        return renderer.background(_prompt(background=background, palette=("blue", "yellow")))

    images = {name: bg(name) for name in ("solid", "gradient", "stripes", "dots", "spotlight", "split")}
    assert len({image.tobytes() for image in images.values()}) == 6
    assert images["solid"].getpixel((50, 50)) == blue
    assert np.allclose(images["gradient"].getpixel((50, 0)), blue, atol=3)
    assert np.allclose(images["gradient"].getpixel((50, 99)), yellow, atol=3)
    assert images["split"].getpixel((10, 50)) == blue and images["split"].getpixel((90, 50)) == yellow
    assert np.allclose(images["spotlight"].getpixel((50, 50)), yellow, atol=3)
    for name in ("stripes", "dots"):
        colours = {tuple(c) for c in np.asarray(images[name]).reshape(-1, 3)}
        assert colours == {blue, yellow}


def test_style_words_change_brightness_and_saturation() -> None:
    renderer = TemplateRenderer(64)
    product = Image.new("RGBA", (4, 4), (0, 0, 0, 0))

    def render(*style: str) -> Image.Image:
        return renderer.render(_prompt(palette=("pink", "beige"), background="split", style=style), product)

    assert _luma(render("dark")) < _luma(render()) < _luma(render("bright"))

    def saturation(image: Image.Image) -> float:
        return float(np.asarray(image.convert("HSV"))[..., 1].mean())

    assert saturation(render("soft")) < saturation(render()) < saturation(render("vivid"))
    assert render("luxury").tobytes() != render().tobytes()  # frame
    busy = renderer.background(_prompt(background="stripes", palette=("teal", "orange"), style=("playful",)))
    calm = renderer.background(_prompt(background="stripes", palette=("teal", "orange"), style=("bold",)))
    assert busy.tobytes() != calm.tobytes()
