"""What every renderer offers: a creative prompt plus a product image in, an ad image out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from PIL import Image

from infra.contracts.prompt import CreativePrompt


@runtime_checkable
class Renderer(Protocol):
    """Turns a :class:`~infra.contracts.prompt.CreativePrompt` and a product image into an ad image.

    Implementations: :class:`serving.render.template.TemplateRenderer` (embedded
    default); a diffusers renderer can be added with the same signature.
    """

    size: int

    def render(self, prompt: CreativePrompt, product_image: Image.Image) -> Image.Image:
        """Return the ad image (RGB, ``size`` × ``size``)."""
        ...
