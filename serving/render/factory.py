"""Choose the renderer from the settings: the template renderer (embedded) or diffusion (production).

>>> from infra.settings import RenderSettings
>>> type(make_renderer(RenderSettings(size=64))).__name__
'TemplateRenderer'
"""

from __future__ import annotations

from infra.settings import RenderSettings
from serving.render.base import Renderer
from serving.render.template import TemplateRenderer


def make_renderer(settings: RenderSettings) -> Renderer:
    """The renderer ``settings.kind`` names, configured from ``settings`` (diffusers is imported only when needed)."""
    if settings.kind == "template":
        return TemplateRenderer(size=settings.size)
    if settings.kind == "diffusion":
        from serving.render.diffusion import DiffusionRenderer

        assert settings.checkpoint is not None  # RenderSettings validates this
        return DiffusionRenderer(
            settings.checkpoint,
            settings.controlnet,
            size=settings.size,
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            controlnet_scale=settings.controlnet_scale,
            device=settings.device,
            seed=settings.seed,
        )
    raise ValueError(f"unknown renderer kind {settings.kind!r}; use template or diffusion")  # pragma: no cover
